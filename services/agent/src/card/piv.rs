//! The `piv` profile's commands: SELECT, the CHUID's GUID, the YubiKey serial and version,
//! PIN and PUK tries, and RESET RETRY COUNTER with the PUK.

use cms_card::apdu::Command;
use cms_card::backend::{CardError, CardTransaction};
use cms_card::iso7816::{CLA, SELECT_BY_NAME, ins};
use cms_card::piv::{self, key_ref, object, yubikey};

use super::minidriver::{Verdict, verdict};
use super::send;

/// Whether the card has the PIV application (and selects it).
pub fn select(tx: &mut dyn CardTransaction) -> Result<bool, CardError> {
    let r = send(
        tx,
        Command::new(CLA, ins::SELECT, SELECT_BY_NAME, 0x00)
            .with_data(piv::AID_RID_PIX.to_vec())
            .with_le(256),
    )?;
    Ok(r.is_ok())
}

/// The CHUID's GUID, the PIV card identifier.
pub fn card_id(tx: &mut dyn CardTransaction) -> Result<Option<Vec<u8>>, CardError> {
    let r = send(
        tx,
        Command::new(CLA, ins::GET_DATA_BER, 0x3F, 0xFF)
            .with_data(piv::tlv(&[object::TAG_LIST], object::CHUID))
            .with_le(256),
    )?;
    if !r.is_ok() {
        return Ok(None);
    }
    Ok(piv::chuid_guid(&r.data).ok().flatten().map(<[u8]>::to_vec))
}

/// The YubiKey serial number (GET SERIAL), when the card has one.
pub fn serial(tx: &mut dyn CardTransaction) -> Result<Option<u32>, CardError> {
    let r = send(
        tx,
        Command::new(CLA, yubikey::INS_GET_SERIAL, 0, 0).with_le(4),
    )?;
    Ok(match (r.is_ok(), <[u8; 4]>::try_from(&r.data[..])) {
        (true, Ok(bytes)) => Some(u32::from_be_bytes(bytes)),
        _ => None,
    })
}

/// The YubiKey firmware version (GET VERSION), when the card tells.
pub fn version(tx: &mut dyn CardTransaction) -> Result<Option<[u8; 3]>, CardError> {
    let r = send(
        tx,
        Command::new(CLA, yubikey::INS_GET_VERSION, 0, 0).with_le(3),
    )?;
    Ok(match (r.is_ok(), <[u8; 3]>::try_from(&r.data[..])) {
        (true, Ok(v)) => Some(v),
        _ => None,
    })
}

/// PIN tries left (VERIFY without data).
pub fn pin_tries(tx: &mut dyn CardTransaction) -> Result<Option<u8>, CardError> {
    let r = send(tx, Command::new(CLA, ins::VERIFY, 0x00, key_ref::PIN))?;
    Ok(match verdict(r.sw) {
        Verdict::Refused { tries_left } => Some(tries_left),
        Verdict::Blocked => Some(0),
        _ => None,
    })
}

/// PUK tries left, from GET METADATA (YubiKey 5.3+); `None` when the card does not tell.
pub fn puk_tries(tx: &mut dyn CardTransaction) -> Result<Option<u8>, CardError> {
    let r = send(
        tx,
        Command::new(CLA, yubikey::INS_GET_METADATA, 0x00, key_ref::PUK).with_le(256),
    )?;
    if !r.is_ok() {
        return Ok(None);
    }
    Ok(piv::find(&r.data, &[yubikey::METADATA_RETRIES])
        .ok()
        .flatten()
        .and_then(|v| v.get(1).copied()))
}

/// RESET RETRY COUNTER with the PUK and the new PIN (each padded to 8 bytes with FF).
pub fn reset_with_puk(
    tx: &mut dyn CardTransaction,
    puk: &[u8],
    new_pin: &[u8],
) -> Result<Verdict, CardError> {
    let (Some(puk), Some(pin)) = (piv::pad_pin(puk), piv::pad_pin(new_pin)) else {
        return Ok(Verdict::Other(cms_card::apdu::StatusWord::WRONG_LENGTH));
    };
    let mut data = Vec::with_capacity(16);
    data.extend_from_slice(&puk[..]);
    data.extend_from_slice(&pin[..]);
    let r = send(
        tx,
        Command::new(CLA, ins::RESET_RETRY_COUNTER, 0x00, key_ref::PIN).with_data(data),
    )?;
    Ok(verdict(r.sw))
}
