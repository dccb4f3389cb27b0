//! Behaviour of the virtual card, command by command, in memory and with a card file.

use std::collections::BTreeMap;

use aes::cipher::{Array, BlockCipherDecrypt, KeyInit};
use cms_cardcrypto::{KeyAlgorithm, SecretKey, response};
use zeroize::Zeroizing;

use super::*;
use crate::apdu::{Command, StatusWord};
use crate::backend::{CardBackend, CardError};
use crate::piv::{self as pivdef, auth, tlv};

const CARD_ID: [u8; 16] = [
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F,
];

fn key(algorithm: KeyAlgorithm, fill: u8) -> SecretKey {
    SecretKey::new(algorithm, &vec![fill; algorithm.key_len()]).expect("key")
}

fn minidriver(algorithm: KeyAlgorithm) -> VirtualCard {
    VirtualCard::new(CardState {
        profile: Profile::Minidriver,
        card_id: CARD_ID.to_vec(),
        serial: 1,
        admin_key: key(algorithm, 0x42),
        admin_tries: state::ADMIN_TRIES,
        pin: Zeroizing::new(b"1234".to_vec()),
        pin_tries: state::PIN_TRIES,
        puk: None,
        puk_tries: 0,
        objects: BTreeMap::new(),
    })
    .with_log(ApduLog::memory())
}

fn piv(algorithm: KeyAlgorithm) -> VirtualCard {
    VirtualCard::new(CardState {
        profile: Profile::Piv,
        card_id: CARD_ID.to_vec(),
        serial: 7_654_321,
        admin_key: key(algorithm, 0x24),
        admin_tries: state::ADMIN_TRIES,
        pin: Zeroizing::new(b"123456".to_vec()),
        pin_tries: state::PIN_TRIES,
        puk: Some(Zeroizing::new(b"12345678".to_vec())),
        puk_tries: state::PUK_TRIES,
        objects: BTreeMap::new(),
    })
    .with_log(ApduLog::memory())
}

fn send(card: &mut VirtualCard, command: Command) -> Response {
    card.process(&command)
}

fn get_challenge(card: &mut VirtualCard, le: usize) -> Response {
    send(card, Command::new(0, 0x84, 0, 0).with_le(le))
}

fn external_authenticate(card: &mut VirtualCard, data: &[u8]) -> StatusWord {
    send(
        card,
        Command::new(0, 0x82, 0, 0x01).with_data(data.to_vec()),
    )
    .sw
}

fn decrypt(key: &SecretKey, block: &[u8]) -> Vec<u8> {
    let mut out = block.to_vec();
    match key.algorithm() {
        KeyAlgorithm::Tdes3Key => {
            let cipher = des::TdesEde3::new_from_slice(key.expose_bytes()).expect("key");
            let block: &mut Array<u8, _> = out.as_mut_slice().try_into().expect("block");
            cipher.decrypt_block(block);
        }
        KeyAlgorithm::Aes128 => {
            let cipher = aes::Aes128::new_from_slice(key.expose_bytes()).expect("key");
            let block: &mut Array<u8, _> = out.as_mut_slice().try_into().expect("block");
            cipher.decrypt_block(block);
        }
        KeyAlgorithm::Aes256 => {
            let cipher = aes::Aes256::new_from_slice(key.expose_bytes()).expect("key");
            let block: &mut Array<u8, _> = out.as_mut_slice().try_into().expect("block");
            cipher.decrypt_block(block);
        }
        other => panic!("no test decryption for {other}"),
    }
    out
}

#[test]
fn atrs_are_well_formed() {
    for atr in [&ATR_MINIDRIVER[..], &ATR_PIV[..]] {
        assert_eq!(atr[0], 0x3B);
        let historical = usize::from(atr[1] & 0x0F);
        assert_eq!(atr.len(), 4 + historical);
        let tck = atr[1..].iter().fold(0u8, |acc, b| acc ^ b);
        assert_eq!(tck, 0, "TCK makes the XOR of T0..TCK zero");
    }
}

#[test]
fn minidriver_offline_unblock_with_a_vector_key() {
    // The gp-emv entry of shared/vectors: the card's admin key is diversified from a master key.
    let vectors: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/data/diversification.json"))
            .expect("vectors");
    let entry = &vectors[0];
    let admin =
        cms_cardcrypto::parse_hex(entry["admin_key"].as_str().expect("hex"), &[24]).expect("hex");
    let mut card = minidriver(KeyAlgorithm::Tdes3Key);
    card.state.admin_key = SecretKey::new(KeyAlgorithm::Tdes3Key, &admin).expect("key");
    card.state.pin_tries = 0;
    assert_eq!(
        send(&mut card, Command::new(0, 0x20, 0, 0x80)).sw,
        StatusWord::AUTH_METHOD_BLOCKED
    );

    let challenge = get_challenge(&mut card, 8);
    assert!(challenge.is_ok());
    assert_eq!(challenge.data.len(), 8);
    let answer = response(&card.state.admin_key, &challenge.data).expect("response");
    assert_eq!(external_authenticate(&mut card, &answer), StatusWord::OK);
    let reset = Command::new(0, 0x2C, 0x02, 0x80).with_data(b"424242".to_vec());
    assert_eq!(send(&mut card, reset).sw, StatusWord::OK);
    let verify = Command::new(0, 0x20, 0, 0x80).with_data(b"424242".to_vec());
    assert_eq!(send(&mut card, verify).sw, StatusWord::OK);
    assert_eq!(card.state.pin_tries, state::PIN_TRIES);
    // The authentication allowed one reset, not two.
    let again = Command::new(0, 0x2C, 0x02, 0x80).with_data(b"9999".to_vec());
    assert_eq!(
        send(&mut card, again).sw,
        StatusWord::SECURITY_STATUS_NOT_SATISFIED
    );
}

#[test]
fn minidriver_challenge_length_follows_the_admin_key() {
    let mut tdes = minidriver(KeyAlgorithm::Tdes3Key);
    assert_eq!(get_challenge(&mut tdes, 256).data.len(), 8);
    assert_eq!(get_challenge(&mut tdes, 16).sw, StatusWord::wrong_le(8));
    let mut aes = minidriver(KeyAlgorithm::Aes128);
    let challenge = get_challenge(&mut aes, 16);
    assert_eq!(challenge.data.len(), 16);
    let answer = response(&aes.state.admin_key, &challenge.data).expect("response");
    assert_eq!(external_authenticate(&mut aes, &answer), StatusWord::OK);
}

#[test]
fn a_challenge_dies_with_any_other_command_and_with_a_reset() {
    let mut card = minidriver(KeyAlgorithm::Tdes3Key);
    let challenge = get_challenge(&mut card, 8);
    let answer = response(&card.state.admin_key, &challenge.data).expect("response");
    // Any command in between, even a harmless one.
    send(&mut card, Command::new(0, 0xCA, 0x01, 0x00).with_le(16));
    assert_eq!(
        external_authenticate(&mut card, &answer),
        StatusWord::CONDITIONS_NOT_SATISFIED
    );
    // A malformed command too.
    let challenge = get_challenge(&mut card, 8);
    let answer = response(&card.state.admin_key, &challenge.data).expect("response");
    card.transmit(&[0x00, 0x20]);
    assert_eq!(
        external_authenticate(&mut card, &answer),
        StatusWord::CONDITIONS_NOT_SATISFIED
    );
    // A reset.
    let challenge = get_challenge(&mut card, 8);
    let answer = response(&card.state.admin_key, &challenge.data).expect("response");
    card.event(CardEvent::Reset);
    assert_eq!(
        external_authenticate(&mut card, &answer),
        StatusWord::CONDITIONS_NOT_SATISFIED
    );
    // None of those cost a try.
    assert_eq!(card.state.admin_tries, state::ADMIN_TRIES);
    // A fresh challenge still works.
    let challenge = get_challenge(&mut card, 8);
    let answer = response(&card.state.admin_key, &challenge.data).expect("response");
    assert_eq!(external_authenticate(&mut card, &answer), StatusWord::OK);
}

#[test]
fn five_wrong_responses_block_the_admin_key_for_good() {
    let mut card = minidriver(KeyAlgorithm::Tdes3Key);
    for left in (0..state::ADMIN_TRIES).rev() {
        get_challenge(&mut card, 8);
        assert_eq!(
            external_authenticate(&mut card, &[0u8; 8]),
            StatusWord::tries_remaining(left)
        );
        assert_eq!(
            external_authenticate(&mut card, &[]),
            if left == 0 {
                StatusWord::AUTH_METHOD_BLOCKED
            } else {
                StatusWord::tries_remaining(left)
            }
        );
    }
    // The right answer no longer helps.
    let challenge = get_challenge(&mut card, 8);
    let answer = response(&card.state.admin_key, &challenge.data).expect("response");
    assert_eq!(
        external_authenticate(&mut card, &answer),
        StatusWord::AUTH_METHOD_BLOCKED
    );
}

#[test]
fn a_blocked_card_stays_blocked_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("card.toml");
    minidriver(KeyAlgorithm::Tdes3Key)
        .state
        .save(&path)
        .expect("saves");
    let mut card = VirtualCard::open(&path).expect("opens");
    for _ in 0..state::ADMIN_TRIES {
        get_challenge(&mut card, 8);
        external_authenticate(&mut card, &[1u8; 8]);
    }
    drop(card);
    let mut card = VirtualCard::open(&path).expect("reopens");
    assert_eq!(card.state.admin_tries, 0);
    let challenge = get_challenge(&mut card, 8);
    let answer = response(&card.state.admin_key, &challenge.data).expect("response");
    assert_eq!(
        external_authenticate(&mut card, &answer),
        StatusWord::AUTH_METHOD_BLOCKED
    );
}

#[test]
fn minidriver_pin_commands() {
    let mut card = minidriver(KeyAlgorithm::Tdes3Key);
    let verify = |pin: &[u8]| Command::new(0, 0x20, 0, 0x80).with_data(pin.to_vec());
    assert_eq!(
        send(&mut card, Command::new(0, 0x20, 0, 0x80)).sw,
        StatusWord(0x63C3)
    );
    assert_eq!(send(&mut card, verify(b"0000")).sw, StatusWord(0x63C2));
    assert_eq!(send(&mut card, verify(b"1234")).sw, StatusWord::OK);
    assert_eq!(
        send(&mut card, Command::new(0, 0x20, 0, 0x80)).sw,
        StatusWord::OK
    );
    let change = Command::new(0, 0x24, 0, 0x80).with_data(b"1234987654".to_vec());
    assert_eq!(send(&mut card, change).sw, StatusWord::OK);
    assert_eq!(&card.state.pin[..], b"987654");
    // Too short to hold the old PIN: a wrong PIN.
    let short = Command::new(0, 0x24, 0, 0x80).with_data(b"98".to_vec());
    assert_eq!(send(&mut card, short).sw, StatusWord(0x63C2));
    let id = send(&mut card, Command::new(0, 0xCA, 0x01, 0x00).with_le(16));
    assert_eq!(&id.data[..], &CARD_ID);
    let select_piv = Command::new(0, 0xA4, 0x04, 0).with_data(pivdef::AID_RID_PIX.to_vec());
    assert_eq!(send(&mut card, select_piv).sw, StatusWord::NOT_FOUND);
    // Reset retry counter without an admin authentication.
    let reset = Command::new(0, 0x2C, 0x02, 0x80).with_data(b"5555".to_vec());
    assert_eq!(
        send(&mut card, reset).sw,
        StatusWord::SECURITY_STATUS_NOT_SATISFIED
    );
}

fn ga(card: &mut VirtualCard, p1: u8, body: Vec<u8>) -> Response {
    send(
        card,
        Command::new(0, 0x87, p1, 0x9B)
            .with_data(tlv(&[auth::TEMPLATE], &body))
            .with_le(256),
    )
}

/// The yubico-piv-tool flow: witness, then decrypted witness + host challenge.
fn mutual_authenticate(card: &mut VirtualCard, p1: u8, host_key: &SecretKey) -> StatusWord {
    let witness = ga(card, p1, vec![auth::WITNESS, 0]);
    assert!(witness.is_ok(), "{:?}", witness.sw);
    let template = pivdef::find(&witness.data, &[auth::TEMPLATE])
        .expect("tlv")
        .expect("7C");
    let encrypted = pivdef::find(template, &[auth::WITNESS])
        .expect("tlv")
        .expect("80");
    let plain = decrypt(host_key, encrypted);
    let host_challenge = vec![0x5A; plain.len()];
    let mut body = tlv(&[auth::WITNESS], &plain);
    body.extend(tlv(&[auth::CHALLENGE], &host_challenge));
    let answer = ga(card, p1, body);
    if answer.is_ok() {
        let template = pivdef::find(&answer.data, &[auth::TEMPLATE])
            .expect("tlv")
            .expect("7C");
        let card_response = pivdef::find(template, &[auth::RESPONSE])
            .expect("tlv")
            .expect("82");
        assert_eq!(
            card_response,
            &response(host_key, &host_challenge).expect("response")[..]
        );
    }
    answer.sw
}

/// The OpenSC flow: challenge, then its encryption.
fn external_piv(card: &mut VirtualCard, p1: u8, host_key: &SecretKey) -> StatusWord {
    let challenge = ga(card, p1, vec![auth::CHALLENGE, 0]);
    assert!(challenge.is_ok(), "{:?}", challenge.sw);
    let template = pivdef::find(&challenge.data, &[auth::TEMPLATE])
        .expect("tlv")
        .expect("7C");
    let plain = pivdef::find(template, &[auth::CHALLENGE])
        .expect("tlv")
        .expect("81");
    let answer = response(host_key, plain).expect("response");
    ga(card, p1, tlv(&[auth::RESPONSE], &answer)).sw
}

#[test]
fn piv_management_key_authenticates_both_ways_with_3des_and_aes() {
    for (algorithm, p1) in [
        (KeyAlgorithm::Tdes3Key, pivdef::algorithm::TDES),
        (KeyAlgorithm::Aes128, pivdef::algorithm::AES128),
        (KeyAlgorithm::Aes256, pivdef::algorithm::AES256),
    ] {
        let mut card = piv(algorithm);
        let right = card.state.admin_key.clone();
        let wrong = key(algorithm, 0x99);
        assert_eq!(mutual_authenticate(&mut card, p1, &right), StatusWord::OK);
        assert_eq!(external_piv(&mut card, p1, &right), StatusWord::OK);
        assert_eq!(
            mutual_authenticate(&mut card, p1, &wrong),
            StatusWord(0x63C4)
        );
        assert_eq!(external_piv(&mut card, p1, &wrong), StatusWord(0x63C3));
        // A success restores the counter.
        assert_eq!(external_piv(&mut card, p1, &right), StatusWord::OK);
        assert_eq!(card.state.admin_tries, state::ADMIN_TRIES);
        // The wrong algorithm in P1 is refused before anything else.
        let other = if p1 == pivdef::algorithm::TDES {
            0x08
        } else {
            0x03
        };
        assert_eq!(
            ga(&mut card, other, vec![auth::WITNESS, 0]).sw,
            StatusWord::WRONG_P1P2
        );
    }
}

#[test]
fn piv_management_key_blocks_after_five_failures_and_challenges_die() {
    let mut card = piv(KeyAlgorithm::Tdes3Key);
    // The witness dies with any other command.
    ga(&mut card, 0x03, vec![auth::WITNESS, 0]);
    send(&mut card, Command::new(0, 0xFD, 0, 0));
    let mut body = tlv(&[auth::WITNESS], &[0u8; 8]);
    body.extend(tlv(&[auth::CHALLENGE], &[0u8; 8]));
    assert_eq!(
        ga(&mut card, 0x03, body).sw,
        StatusWord::CONDITIONS_NOT_SATISFIED
    );
    let wrong = key(KeyAlgorithm::Tdes3Key, 0x77);
    for _ in 0..5 {
        external_piv(&mut card, 0x03, &wrong);
    }
    assert_eq!(card.state.admin_tries, 0);
    assert_eq!(
        ga(&mut card, 0x03, vec![auth::WITNESS, 0]).sw,
        StatusWord::AUTH_METHOD_BLOCKED
    );
}

fn padded(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = pivdef::pad_pin(a).expect("fits").to_vec();
    out.extend_from_slice(&pivdef::pad_pin(b).expect("fits")[..]);
    out
}

#[test]
fn piv_pin_and_puk() {
    let mut card = piv(KeyAlgorithm::Tdes3Key);
    let select = Command::new(0, 0xA4, 0x04, 0).with_data(pivdef::AID_RID_PIX.to_vec());
    let selected = send(&mut card, select);
    assert!(selected.is_ok());
    assert_eq!(selected.data[0], 0x61);
    let verify = |pin: &[u8]| {
        Command::new(0, 0x20, 0, 0x80).with_data(pivdef::pad_pin(pin).expect("fits").to_vec())
    };
    for left in [2u8, 1, 0] {
        assert_eq!(
            send(&mut card, verify(b"000000")).sw,
            StatusWord::tries_remaining(left)
        );
    }
    assert_eq!(
        send(&mut card, verify(b"123456")).sw,
        StatusWord::AUTH_METHOD_BLOCKED
    );
    // Wrong PUK costs a PUK try; the right one resets the PIN.
    let unblock =
        |puk: &[u8], pin: &[u8]| Command::new(0, 0x2C, 0, 0x80).with_data(padded(puk, pin));
    assert_eq!(
        send(&mut card, unblock(b"87654321", b"654321")).sw,
        StatusWord(0x63C4)
    );
    assert_eq!(
        send(&mut card, unblock(b"12345678", b"654321")).sw,
        StatusWord::OK
    );
    assert_eq!(card.state.puk_tries, state::PUK_TRIES);
    assert_eq!(send(&mut card, verify(b"654321")).sw, StatusWord::OK);
    // Change PIN and PUK.
    let change_pin = Command::new(0, 0x24, 0, 0x80).with_data(padded(b"654321", b"11223344"));
    assert_eq!(send(&mut card, change_pin).sw, StatusWord::OK);
    let change_puk = Command::new(0, 0x24, 0, 0x81).with_data(padded(b"12345678", b"87654321"));
    assert_eq!(send(&mut card, change_puk).sw, StatusWord::OK);
    // Five wrong PUKs block it for good.
    for _ in 0..5 {
        send(&mut card, unblock(b"00000000", b"123123"));
    }
    assert_eq!(
        send(&mut card, unblock(b"87654321", b"123123")).sw,
        StatusWord::AUTH_METHOD_BLOCKED
    );
    // Metadata shows the counters.
    let meta = send(&mut card, Command::new(0, 0xF7, 0, 0x81));
    assert_eq!(
        pivdef::find(&meta.data, &[0x06]).expect("tlv"),
        Some(&[5u8, 0][..])
    );
}

#[test]
fn piv_objects_and_yubikey_extensions() {
    let mut card = piv(KeyAlgorithm::Tdes3Key);
    let get = |tag: &[u8]| {
        Command::new(0, 0xCB, 0x3F, 0xFF)
            .with_data(tlv(&[0x5C], tag))
            .with_le(256)
    };
    let chuid = send(&mut card, get(pivdef::object::CHUID));
    assert_eq!(
        pivdef::chuid_guid(&chuid.data).expect("tlv"),
        Some(&CARD_ID[..])
    );
    assert!(send(&mut card, get(pivdef::object::CCC)).is_ok());
    let discovery = send(&mut card, get(pivdef::object::DISCOVERY));
    assert_eq!(discovery.data[0], 0x7E);
    assert_eq!(
        send(&mut card, get(&[0x5F, 0xC1, 0x05])).sw,
        StatusWord::NOT_FOUND
    );
    assert_eq!(
        &send(&mut card, Command::new(0, 0xFD, 0, 0)).data[..],
        &[5, 4, 3]
    );
    assert_eq!(
        &send(&mut card, Command::new(0, 0xF8, 0, 0)).data[..],
        &7_654_321u32.to_be_bytes()
    );
    // SET MANAGEMENT KEY needs the management key, then takes AES too.
    let mut set = vec![0x08, 0x9B, 16];
    set.extend_from_slice(&[0x31; 16]);
    let set_key = Command::new(0, 0xFF, 0xFF, 0xFF).with_data(set);
    assert_eq!(
        send(&mut card, set_key.clone()).sw,
        StatusWord::SECURITY_STATUS_NOT_SATISFIED
    );
    let right = card.state.admin_key.clone();
    assert_eq!(mutual_authenticate(&mut card, 0x03, &right), StatusWord::OK);
    assert_eq!(send(&mut card, set_key).sw, StatusWord::OK);
    let new = key(KeyAlgorithm::Aes128, 0x31);
    assert_eq!(mutual_authenticate(&mut card, 0x08, &new), StatusWord::OK);
    let meta = send(&mut card, Command::new(0, 0xF7, 0, 0x9B));
    assert_eq!(
        pivdef::find(&meta.data, &[0x01]).expect("tlv"),
        Some(&[0x08u8][..])
    );
    // PUT DATA, then GET DATA returns it; an empty object deletes it.
    let mut put = tlv(&[0x5C], &[0x5F, 0xC1, 0x07]);
    put.extend(tlv(&[0x53], &[0xF0, 0x00]));
    let put = Command::new(0, 0xDB, 0x3F, 0xFF).with_data(put);
    assert_eq!(send(&mut card, put).sw, StatusWord::OK);
    assert_eq!(
        &send(&mut card, get(pivdef::object::CCC)).data[..],
        &[0x53, 0x02, 0xF0, 0x00]
    );
}

#[test]
fn command_chaining_reassembles_the_data() {
    let mut card = piv(KeyAlgorithm::Tdes3Key);
    let data = padded(b"123456", b"");
    let first = Command::new(0x10, 0x20, 0, 0x80).with_data(data[..4].to_vec());
    assert_eq!(send(&mut card, first).sw, StatusWord::OK);
    let last = Command::new(0x00, 0x20, 0, 0x80).with_data(data[4..8].to_vec());
    assert_eq!(send(&mut card, last).sw, StatusWord::OK);
}

#[test]
fn the_log_has_headers_and_status_words_only() {
    let mut card = piv(KeyAlgorithm::Tdes3Key);
    let verify = Command::new(0, 0x20, 0, 0x80)
        .with_data(pivdef::pad_pin(b"123456").expect("fits").to_vec());
    send(&mut card, verify);
    card.event(CardEvent::Removed);
    let lines = card.log().expect("log").lines().join("\n");
    assert_eq!(lines, "apdu 00 20 00 80 lc=8 le=- sw=9000\nevent removed");
}

#[test]
fn in_process_reader_voids_a_transaction_when_the_card_is_pulled() {
    let mut reader = SimReader::new(minidriver(KeyAlgorithm::Tdes3Key));
    let puller = reader.clone();
    {
        let mut tx = reader.transaction().expect("transaction");
        assert_eq!(tx.atr(), &ATR_MINIDRIVER[..]);
        let challenge = tx
            .transmit(&Command::new(0, 0x84, 0, 0).with_le(8))
            .expect("challenge");
        assert_eq!(challenge.data.len(), 8);
        puller.remove();
        let err = tx
            .transmit(&Command::new(0, 0x82, 0, 1).with_data(vec![0; 8]))
            .expect_err("card gone");
        assert_eq!(err, CardError::Removed);
    }
    assert_eq!(reader.transaction().err(), Some(CardError::NoCard));
    puller.insert();
    let mut tx = reader.transaction().expect("transaction");
    // The challenge died with the removal.
    let sw = tx
        .transmit(&Command::new(0, 0x82, 0, 1).with_data(vec![0; 8]))
        .expect("answer")
        .sw;
    assert_eq!(sw, StatusWord::CONDITIONS_NOT_SATISFIED);
    assert_eq!(
        puller.with_card(|card| card.state().admin_tries),
        state::ADMIN_TRIES
    );
}

#[test]
fn long_answers_come_in_le_sized_pieces() {
    let mut card = piv(KeyAlgorithm::Tdes3Key);
    let full = send(
        &mut card,
        Command::new(0, 0xCB, 0x3F, 0xFF)
            .with_data(tlv(&[0x5C], pivdef::object::CHUID))
            .with_le(256),
    );
    // OpenSC asks for 8 bytes first to learn the length.
    let head = send(
        &mut card,
        Command::new(0, 0xCB, 0x3F, 0xFF)
            .with_data(tlv(&[0x5C], pivdef::object::CHUID))
            .with_le(8),
    );
    assert_eq!(&head.data[..], &full.data[..8]);
    assert_eq!(head.sw.bytes_remaining(), Some(full.data.len() - 8));
    let rest = send(&mut card, Command::new(0, 0xC0, 0, 0).with_le(256));
    assert!(rest.is_ok());
    assert_eq!(&rest.data[..], &full.data[8..]);
    // Nothing left.
    assert_eq!(
        send(&mut card, Command::new(0, 0xC0, 0, 0).with_le(256)).sw,
        StatusWord::CONDITIONS_NOT_SATISFIED
    );
}
