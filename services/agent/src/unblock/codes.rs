//! Typed codes checked before the card sees a byte: the response (hex with its checksum), the
//! PUK (digits with its checksum), the SO unblock key and its KCV. Errors say what is wrong,
//! never what was typed.

use cms_cardcrypto::code::CHECKSUM_DIGITS;
use cms_cardcrypto::{CodeError, KeyAlgorithm, SoTokenError, SoUnblockKey, Zeroizing};
use cms_proto::agent::v1::{UnblockOutcome, UnblockResult};
use cms_proto::common::v1::{ErrorReason, TypedCode};
use subtle::ConstantTimeEq;

use super::outcome::result;

/// Maps a typed-code error to the result shown, naming the field (`what`).
pub fn code_error(what: &str, err: &CodeError) -> UnblockResult {
    let (outcome, reason) = match err {
        CodeError::ChecksumMismatch => (
            UnblockOutcome::ChecksumMismatch,
            ErrorReason::CodeChecksumMismatch,
        ),
        CodeError::ChecksumMalformed => (
            UnblockOutcome::ChecksumMismatch,
            ErrorReason::CodeChecksumMismatch,
        ),
        CodeError::ChecksumMissing { .. } => (
            UnblockOutcome::InvalidCode,
            ErrorReason::CodeChecksumMissing,
        ),
        CodeError::NotHex { .. } => (UnblockOutcome::InvalidCode, ErrorReason::CodeNotHex),
        CodeError::Empty | CodeError::WrongLength { .. } | CodeError::OddDigits { .. } => {
            (UnblockOutcome::InvalidCode, ErrorReason::CodeWrongLength)
        }
    };
    result(
        outcome,
        reason,
        format!("{what}: {err}; the card was not touched"),
    )
}

fn missing_checksum(what: &str) -> UnblockResult {
    result(
        UnblockOutcome::InvalidCode,
        ErrorReason::CodeChecksumMissing,
        format!("{what}: the 4-character checksum is missing; the card was not touched"),
    )
}

/// The response typed for a challenge of `length` bytes.
pub fn response(
    code: Option<&TypedCode>,
    length: usize,
) -> Result<Zeroizing<Vec<u8>>, UnblockResult> {
    let Some(code) = code else {
        return Err(code_error("the response", &CodeError::Empty));
    };
    if code.checksum.trim().is_empty() {
        // Check the digits first, so a typo there is named even without a checksum.
        cms_cardcrypto::parse_hex(&code.hex, &[length])
            .map_err(|e| code_error("the response", &e))?;
        return Err(missing_checksum("the response"));
    }
    cms_cardcrypto::parse_with_checksum(&code.hex, &code.checksum, &[length])
        .map_err(|e| code_error("the response", &e))
}

/// The PUK read out by the helpdesk: 6 to 8 digits (spaces and dashes ignored) and the
/// checksum of those ASCII digits.
pub fn puk(typed: &str, checksum: &str) -> Result<Zeroizing<Vec<u8>>, UnblockResult> {
    let invalid = |message: &str| {
        result(
            UnblockOutcome::InvalidCode,
            ErrorReason::CodeWrongLength,
            format!("the PUK: {message}; the card was not touched"),
        )
    };
    let mut digits = Zeroizing::new(Vec::with_capacity(8));
    for (index, c) in typed.chars().enumerate() {
        if c == '-' || c.is_whitespace() {
            continue;
        }
        if !c.is_ascii_digit() {
            return Err(result(
                UnblockOutcome::InvalidCode,
                ErrorReason::CodeNotHex,
                format!(
                    "the PUK: character {} is not a digit; the card was not touched",
                    index + 1
                ),
            ));
        }
        digits.push(c as u8);
    }
    if !cms_cardcrypto::puk::PUK_LENGTHS.contains(&digits.len()) {
        return Err(invalid(&format!(
            "it has {} digits, expected 6 to 8",
            digits.len()
        )));
    }
    let typed_sum: String = checksum
        .chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if typed_sum.is_empty() {
        return Err(missing_checksum("the PUK"));
    }
    if typed_sum.len() != CHECKSUM_DIGITS || !typed_sum.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(code_error(
            "the PUK's checksum",
            &CodeError::ChecksumMalformed,
        ));
    }
    let computed = Zeroizing::new(cms_cardcrypto::checksum(&digits));
    if !bool::from(computed.as_bytes().ct_eq(typed_sum.as_bytes())) {
        return Err(code_error("the PUK", &CodeError::ChecksumMismatch));
    }
    Ok(digits)
}

/// Number of hex digits typed (separators ignored), to tell key lengths apart.
fn hex_digit_count(text: &str) -> usize {
    text.chars().filter(|c| c.is_ascii_hexdigit()).count()
}

/// The SO unblock key: `hex` with its checksum in `checksum` or appended to `hex`. With no
/// algorithm given, it is told from the key's length and the card's challenge length.
pub fn so_key(
    code: Option<&TypedCode>,
    algorithm: Option<KeyAlgorithm>,
    challenge_length: usize,
) -> Result<SoUnblockKey, UnblockResult> {
    let Some(code) = code else {
        return Err(code_error("the SO unblock key", &CodeError::Empty));
    };
    let mut text = Zeroizing::new(String::with_capacity(
        code.hex.len() + code.checksum.len() + 1,
    ));
    text.push_str(&code.hex);
    text.push(' ');
    text.push_str(&code.checksum);
    let algorithm = match algorithm {
        Some(a) => a,
        None => {
            let key_len = hex_digit_count(&text).saturating_sub(CHECKSUM_DIGITS) / 2;
            match (key_len, challenge_length) {
                (16, 8) => KeyAlgorithm::Tdes2Key,
                (24, 8) => KeyAlgorithm::Tdes3Key,
                (16, 16) => KeyAlgorithm::Aes128,
                (24, 16) => KeyAlgorithm::Aes192,
                (32, 16) => KeyAlgorithm::Aes256,
                _ => {
                    return Err(code_error(
                        "the SO unblock key",
                        &CodeError::WrongLength {
                            got_digits: key_len * 2 + CHECKSUM_DIGITS,
                            expected_digits: if challenge_length == 8 {
                                vec![36, 52]
                            } else {
                                vec![36, 52, 68]
                            },
                        },
                    ));
                }
            }
        }
    };
    if algorithm.block_len() != challenge_length {
        return Err(result(
            UnblockOutcome::Unsupported,
            ErrorReason::InvalidArgument,
            format!(
                "the card's admin key answers {challenge_length}-byte challenges, but the key is {algorithm}; the card was not touched"
            ),
        ));
    }
    SoUnblockKey::parse(algorithm, &text).map_err(|e| match e {
        SoTokenError::Code(c) => code_error("the SO unblock key", &c),
        other => result(
            UnblockOutcome::InvalidCode,
            ErrorReason::InvalidArgument,
            format!("{other}; the card was not touched"),
        ),
    })
}

/// Checks the key against the KCV recorded at initialisation (6 hex characters; empty: skip).
pub fn check_kcv(key: &SoUnblockKey, expected: &str) -> Result<(), UnblockResult> {
    if expected.trim().is_empty() {
        return Ok(());
    }
    let expected = cms_cardcrypto::parse_hex(expected, &[cms_cardcrypto::primitives::KCV_LEN])
        .map_err(|e| code_error("the expected KCV", &e))?;
    if bool::from(key.kcv()[..].ct_eq(&expected[..])) {
        Ok(())
    } else {
        Err(result(
            UnblockOutcome::KcvMismatch,
            ErrorReason::KcvMismatch,
            "the SO unblock key does not match the KCV recorded at initialisation; the card was not touched",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(hex: &str, checksum: &str) -> TypedCode {
        TypedCode {
            hex: hex.into(),
            checksum: checksum.into(),
        }
    }

    fn outcome(r: UnblockResult) -> UnblockOutcome {
        UnblockOutcome::try_from(r.outcome).unwrap()
    }

    #[test]
    fn response_checks_length_hex_and_checksum() {
        let good = response(Some(&code("1603 ebdf-1c8a 2e72", "9d70")), 8).unwrap();
        assert_eq!(good.len(), 8);
        let typo = response(Some(&code("1603 EBDF 1C8A 2E73", "9D70")), 8).unwrap_err();
        assert_eq!(outcome(typo.clone()), UnblockOutcome::ChecksumMismatch);
        assert!(!typo.message.contains("2E73") && !typo.message.contains("9D70"));
        let short = response(Some(&code("1603 EBDF 1C8A", "9D70")), 8).unwrap_err();
        assert_eq!(outcome(short), UnblockOutcome::InvalidCode);
        let not_hex = response(Some(&code("1603 EBDF 1C8A 2E7G", "9D70")), 8).unwrap_err();
        assert_eq!(not_hex.reason, ErrorReason::CodeNotHex as i32);
        let aes_for_3des = response(Some(&code("1603 EBDF 1C8A 2E72", "9D70")), 16).unwrap_err();
        assert_eq!(outcome(aes_for_3des), UnblockOutcome::InvalidCode);
        let missing = response(Some(&code("1603 EBDF 1C8A 2E72", "")), 8).unwrap_err();
        assert_eq!(missing.reason, ErrorReason::CodeChecksumMissing as i32);
    }

    #[test]
    fn puk_is_digits_with_their_checksum() {
        let sum = cms_cardcrypto::checksum(b"12345678");
        assert_eq!(
            &puk("1234-5678", &sum.to_lowercase()).unwrap()[..],
            b"12345678"
        );
        assert_eq!(
            outcome(puk("12345679", &sum).unwrap_err()),
            UnblockOutcome::ChecksumMismatch
        );
        assert_eq!(
            outcome(puk("1234567A", &sum).unwrap_err()),
            UnblockOutcome::InvalidCode
        );
        assert_eq!(
            outcome(puk("12345", &sum).unwrap_err()),
            UnblockOutcome::InvalidCode
        );
        assert_eq!(
            puk("12345678", "").unwrap_err().reason,
            ErrorReason::CodeChecksumMissing as i32
        );
    }

    #[test]
    fn so_key_algorithm_follows_the_card() {
        let key = SoUnblockKey::generate(KeyAlgorithm::Aes128, &mut |b| {
            for (i, x) in b.iter_mut().enumerate() {
                *x = i as u8 * 7 + 1;
            }
        })
        .unwrap();
        let shown = key.display();
        let typed = code(&shown, "");
        let parsed = so_key(Some(&typed), None, 16).unwrap();
        assert_eq!(parsed.algorithm(), KeyAlgorithm::Aes128);
        assert_eq!(parsed.kcv(), key.kcv());
        // The same 16 bytes on a 3DES card are read as 2-key 3DES.
        assert_eq!(
            so_key(Some(&typed), None, 8).unwrap().algorithm(),
            KeyAlgorithm::Tdes2Key
        );
        // An AES key named for a 3DES card is refused before the card.
        assert_eq!(
            outcome(so_key(Some(&typed), Some(KeyAlgorithm::Aes128), 8).unwrap_err()),
            UnblockOutcome::Unsupported
        );
        let kcv = data_encoding::HEXLOWER.encode(&key.kcv());
        check_kcv(&parsed, &kcv).unwrap();
        assert_eq!(
            outcome(check_kcv(&parsed, "000000").unwrap_err()),
            UnblockOutcome::KcvMismatch
        );
    }
}
