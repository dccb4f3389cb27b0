//! Shared helpers of the agent tests: virtual cards keyed from the shared vectors' master keys,
//! the helpdesk's side of the offline flow (the response computed from the master key), and the
//! card's APDU log.
#![allow(dead_code)]

use std::sync::Arc;

use cms_agent::card::sim::SimReaders;
use cms_agent::{Agent, CardSettings};
use cms_card::sim::{ApduLog, CardState, LogEntry, Profile, SimReader, VirtualCard};
use cms_cardcrypto::{KeyAlgorithm, PukInput, Scheme, SecretKey, derive_puk, diversify};
use cms_proto::common::v1::TypedCode;

/// The vectors copied from shared/vectors/diversification.json.
const VECTORS: &str = include_str!("diversification.json");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    Tdes,
    Aes,
}

fn hex(text: &str) -> Vec<u8> {
    cms_cardcrypto::parse_hex(text, &[]).unwrap().to_vec()
}

/// A vector's master key, scheme and (16-byte) card id for `alg`: gp-emv for 3DES (its master
/// key, on a 16-byte card id as the virtual card needs), sp800-108-cmac for AES.
pub fn master(alg: Alg) -> (Scheme, SecretKey, Vec<u8>) {
    let vectors: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
    let wanted = match alg {
        Alg::Tdes => "gp-emv",
        Alg::Aes => "sp800-108-cmac",
    };
    let v = vectors
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["scheme"] == wanted)
        .unwrap();
    let (scheme, algorithm) = match alg {
        Alg::Tdes => (Scheme::GpEmv, KeyAlgorithm::Tdes2Key),
        Alg::Aes => (Scheme::Sp800108Cmac, KeyAlgorithm::Aes128),
    };
    let key = SecretKey::new(algorithm, &hex(v["master_key"].as_str().unwrap())).unwrap();
    // The vector itself holds: same derivation as custody's.
    let vector_id = hex(v["card_id"].as_str().unwrap());
    let out_len = hex(v["admin_key"].as_str().unwrap()).len();
    let derived = diversify(scheme, &key, &vector_id, 1, out_len).unwrap();
    assert_eq!(
        derived.expose_bytes(),
        &hex(v["admin_key"].as_str().unwrap())[..]
    );
    let card_id = match alg {
        Alg::Tdes => (0x10..0x20).collect(),
        Alg::Aes => vector_id,
    };
    (scheme, key, card_id)
}

/// A card and what the test (as helpdesk and custody) knows about it.
pub struct TestCard {
    pub reader: SimReader,
    pub admin_key: SecretKey,
    pub card_id: Vec<u8>,
    pub puk: Vec<u8>,
}

pub const OLD_PIN: &[u8] = b"135790";

/// A minidriver card whose admin key is diversified from the vectors' master key.
pub fn minidriver_state(alg: Alg) -> (CardState, SecretKey) {
    let (scheme, master, card_id) = master(alg);
    let len = match alg {
        Alg::Tdes => 24,
        Alg::Aes => 16,
    };
    let admin_key = diversify(scheme, &master, &card_id, 1, len).unwrap();
    let state = CardState {
        profile: Profile::Minidriver,
        card_id,
        serial: 4711,
        admin_key: admin_key.clone(),
        admin_tries: cms_card::sim::state::ADMIN_TRIES,
        pin: zeroize::Zeroizing::new(OLD_PIN.to_vec()),
        pin_tries: 0,
        puk: None,
        puk_tries: 0,
        objects: Default::default(),
    };
    (state, admin_key)
}

/// A blocked PIV card whose PUK is derived from the vectors' master key (as custody does).
pub fn piv_state(alg: Alg) -> (CardState, Vec<u8>) {
    let (_, master, card_id) = master(alg);
    let puk = derive_puk(
        &master,
        &PukInput {
            card_id: &card_id,
            master_key_version: 1,
            puk_version: 1,
            digits: 8,
        },
    )
    .unwrap();
    let management = match alg {
        Alg::Tdes => SecretKey::new(
            KeyAlgorithm::Tdes3Key,
            &cms_card::sim::state::DEFAULT_MANAGEMENT_KEY,
        )
        .unwrap(),
        Alg::Aes => SecretKey::new(KeyAlgorithm::Aes128, &[7u8; 16]).unwrap(),
    };
    let state = CardState {
        profile: Profile::Piv,
        card_id,
        serial: 1234567,
        admin_key: management,
        admin_tries: cms_card::sim::state::ADMIN_TRIES,
        pin: zeroize::Zeroizing::new(OLD_PIN.to_vec()),
        pin_tries: 0,
        puk: Some(zeroize::Zeroizing::new(puk.expose_digits().to_vec())),
        puk_tries: cms_card::sim::state::PUK_TRIES,
        objects: Default::default(),
    };
    (state, puk.expose_digits().to_vec())
}

pub fn minidriver_card(alg: Alg) -> TestCard {
    let (state, admin_key) = minidriver_state(alg);
    let card_id = state.card_id.clone();
    let reader = SimReader::new(VirtualCard::new(state).with_log(ApduLog::memory()));
    TestCard {
        reader,
        admin_key,
        card_id,
        puk: Vec::new(),
    }
}

pub fn piv_card(alg: Alg) -> TestCard {
    let (state, puk) = piv_state(alg);
    let card_id = state.card_id.clone();
    let admin_key = state.admin_key.clone();
    let reader = SimReader::new(VirtualCard::new(state).with_log(ApduLog::memory()));
    TestCard {
        reader,
        admin_key,
        card_id,
        puk,
    }
}

pub const READER: &str = "Virtual Reader 0";

/// An offline agent over one simulated reader.
pub fn agent(card: &TestCard) -> Arc<Agent> {
    let readers = SimReaders::default().with(READER, card.reader.clone());
    Arc::new(Agent::offline(Arc::new(readers), &CardSettings::default()))
}

/// The helpdesk side: checks the challenge's checksum as the operator types it, and computes
/// the response with the admin key custody would derive.
pub fn respond(admin_key: &SecretKey, challenge: &TypedCode) -> TypedCode {
    let bytes =
        cms_cardcrypto::parse_with_checksum(&challenge.hex, &challenge.checksum, &[8, 16]).unwrap();
    let response = cms_cardcrypto::response(admin_key, &bytes).unwrap();
    TypedCode {
        hex: cms_cardcrypto::format_groups(&response),
        checksum: cms_cardcrypto::checksum(&response),
    }
}

/// The same response with one hex digit changed (a wrong response with a right checksum).
pub fn wrong(response: &TypedCode) -> TypedCode {
    let mut bytes = cms_cardcrypto::parse_hex(&response.hex, &[])
        .unwrap()
        .to_vec();
    bytes[0] ^= 0x01;
    TypedCode {
        hex: cms_cardcrypto::format_groups(&bytes),
        checksum: cms_cardcrypto::checksum(&bytes),
    }
}

/// The card's APDU log (commands only).
pub fn log(reader: &SimReader) -> Vec<LogEntry> {
    reader.with_card(|c| {
        c.log()
            .map(|l| {
                l.lines()
                    .iter()
                    .filter_map(|line| LogEntry::parse_line(line))
                    .collect()
            })
            .unwrap_or_default()
    })
}

pub const EXTERNAL_AUTHENTICATE: u8 = 0x82;
pub const RESET_RETRY_COUNTER: u8 = 0x2C;

/// Whether the PIN verifies on the card now (VERIFY through the card's own command path).
pub fn pin_verifies(reader: &SimReader, pin: &[u8]) -> bool {
    use cms_card::apdu::Command;
    reader.with_card(|c| {
        let data = if c.state().profile == Profile::Piv {
            c.process(&Command::new(0, 0xA4, 4, 0).with_data(cms_card::piv::AID_RID_PIX.to_vec()));
            cms_card::piv::pad_pin(pin).unwrap().to_vec()
        } else {
            pin.to_vec()
        };
        c.process(&Command::new(0, 0x20, 0, 0x80).with_data(data))
            .is_ok()
    })
}

pub fn admin_tries(reader: &SimReader) -> u8 {
    reader.with_card(|c| c.state().admin_tries)
}

/// EXTERNAL AUTHENTICATE commands that carried a response (the tries probe carries none).
pub fn responses_sent(reader: &SimReader) -> usize {
    log(reader)
        .iter()
        .filter(|e| e.ins == EXTERNAL_AUTHENTICATE && e.lc > 0)
        .count()
}
