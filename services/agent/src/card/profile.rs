//! Which profile a card speaks and what it says about itself: the ATR, then SELECT of the PIV
//! application (a minidriver card answers 6A82), then the profile's identifier and counters.

use cms_card::backend::{CardError, CardTransaction};
use cms_proto::agent::v1::CardInfo;
use cms_proto::common::v1::{CardProfile, KeyAlgorithm};

use super::{minidriver, piv};

/// The card profiles the agent speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Minidriver,
    Piv,
}

impl Profile {
    /// The card's own limits on the PIN length, in characters.
    pub fn pin_length_limits(self) -> (usize, usize) {
        match self {
            Profile::Minidriver => (
                cms_card::minidriver::MIN_PIN_LEN,
                cms_card::minidriver::MAX_PIN_LEN,
            ),
            Profile::Piv => (6, 8),
        }
    }
}

/// What the agent read from a card. No secrets.
#[derive(Debug, Clone, Default)]
pub struct CardFacts {
    pub reader: String,
    pub atr: Vec<u8>,
    pub profile: Option<Profile>,
    pub card_id: Vec<u8>,
    pub serial: String,
    pub pin_tries_left: Option<u8>,
    /// Admin-key tries (minidriver) or PUK tries (PIV).
    pub admin_tries_left: Option<u8>,
    /// 8 or 16 for a minidriver card once a challenge was read; 0 otherwise.
    pub challenge_length: usize,
    pub description: String,
}

impl CardFacts {
    /// Whether the admin key or PUK is known to be blocked.
    pub fn admin_blocked(&self) -> bool {
        self.admin_tries_left == Some(0)
    }

    /// The local API's view.
    pub fn to_proto(&self) -> CardInfo {
        let profile = match self.profile {
            Some(Profile::Minidriver) => CardProfile::Minidriver,
            Some(Profile::Piv) => CardProfile::Piv,
            None => CardProfile::Unspecified,
        };
        let algorithm = match (self.profile, self.challenge_length) {
            (Some(Profile::Minidriver), 8) => KeyAlgorithm::Tdes3key,
            (Some(Profile::Minidriver), 16) => KeyAlgorithm::Aes128,
            _ => KeyAlgorithm::Unspecified,
        };
        CardInfo {
            reader: self.reader.clone(),
            atr: self.atr.clone(),
            profile: profile as i32,
            card_id: self.card_id.clone(),
            serial: self.serial.clone(),
            pin_tries_left: self.pin_tries_left.map(u32::from),
            pin_blocked: self.pin_tries_left == Some(0),
            admin_tries_left: self.admin_tries_left.map(u32::from),
            challenge_length: self.challenge_length as u32,
            admin_key_algorithm: algorithm as i32,
            description: self.description.clone(),
            admin_blocked: self.admin_blocked(),
        }
    }
}

/// What the ATR's historical bytes say about the product, where we know it.
fn product_from_atr(atr: &[u8]) -> Option<&'static str> {
    let contains = |needle: &[u8]| atr.windows(needle.len()).any(|w| w == needle);
    if contains(b"CMSvcard") {
        Some("CMS virtual card")
    } else if contains(b"YubiKey") || contains(b"Yubikey") {
        Some("YubiKey")
    } else {
        None
    }
}

/// Detects the profile and reads identifier and counters. Commands sent: SELECT, GET DATA,
/// VERIFY and EXTERNAL AUTHENTICATE without data (they only report counters: nothing is
/// burned), and on PIV the YubiKey GET SERIAL / GET VERSION / GET METADATA.
pub fn detect(tx: &mut dyn CardTransaction, reader: &str) -> Result<CardFacts, CardError> {
    let mut facts = CardFacts {
        reader: reader.to_owned(),
        atr: tx.atr().to_vec(),
        ..CardFacts::default()
    };
    if piv::select(tx)? {
        facts.profile = Some(Profile::Piv);
        facts.card_id = piv::card_id(tx)?.unwrap_or_default();
        let serial = piv::serial(tx)?;
        facts.serial = serial.map(|s| s.to_string()).unwrap_or_default();
        facts.pin_tries_left = piv::pin_tries(tx)?;
        facts.admin_tries_left = piv::puk_tries(tx)?;
        let product = product_from_atr(&facts.atr).unwrap_or("PIV card");
        facts.description = match piv::version(tx)? {
            Some([a, b, c]) => format!("{product} (PIV, YubiKey-compatible {a}.{b}.{c})"),
            None => format!("{product} (PIV)"),
        };
        return Ok(facts);
    }
    if let Some(id) = minidriver::card_id(tx)? {
        facts.profile = Some(Profile::Minidriver);
        facts.serial = data_encoding::HEXUPPER.encode(&id);
        facts.card_id = id;
        facts.pin_tries_left = minidriver::pin_tries(tx)?;
        facts.admin_tries_left = minidriver::admin_tries(tx)?;
        let product = product_from_atr(&facts.atr).unwrap_or("smart card");
        facts.description = format!("{product} (minidriver)");
    }
    Ok(facts)
}
