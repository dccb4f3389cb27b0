//! Known-answer tests run at start. If any fails, custody refuses all work
//! (FAILED_PRECONDITION) rather than hand out wrong cryptograms that burn cards' tries.
//! The answers are published values (FIPS-197, SP 800-67, RFC 4493), one derivation per
//! scheme family checked against shared/vectors, and one PIV PUK per PRF.

use cms_cardcrypto::{KeyAlgorithm, PukInput, Scheme, SecretKey};

/// The bytes of a known answer written in this file (a typo decodes to nothing, and fails).
fn hex(s: &str) -> Vec<u8> {
    data_encoding::HEXUPPER_PERMISSIVE
        .decode(s.as_bytes())
        .unwrap_or_default()
}

fn check(name: &str, got: &[u8], want: &str) -> Result<(), String> {
    if got == hex(want).as_slice() {
        Ok(())
    } else {
        Err(format!("known-answer test {name} failed"))
    }
}

pub fn run(inject_failure: bool) -> Result<(), String> {
    if inject_failure {
        return Err("known-answer test failure injected by guards.fail_self_test".into());
    }
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let aes = cms_cardcrypto::aes_ecb_encrypt(
        &hex("000102030405060708090A0B0C0D0E0F"),
        &hex("00112233445566778899AABBCCDDEEFF"),
    )
    .map_err(|x| e(&x))?;
    check(
        "AES-128 FIPS-197",
        &aes[..],
        "69C4E0D86A7B0430D8CDB78070B4C55A",
    )?;
    let tdes = cms_cardcrypto::tdes_ecb_encrypt(
        &hex("0123456789ABCDEF23456789ABCDEF01456789ABCDEF0123"),
        &hex("5468652071756663"),
    )
    .map_err(|x| e(&x))?;
    check("3DES SP 800-67", &tdes[..], "A826FD8CE53B855F")?;
    let cmac = cms_cardcrypto::aes_cmac(
        &hex("2B7E151628AED2A6ABF7158809CF4F3C"),
        &hex("6BC1BEE22E409F96E93D7E117393172A"),
    )
    .map_err(|x| e(&x))?;
    check(
        "AES-CMAC RFC 4493",
        &cmac[..],
        "070A16B46B4D4144F79BDD9DD04A287C",
    )?;

    let mk = SecretKey::new(
        KeyAlgorithm::Tdes2Key,
        &hex("404142434445464748494A4B4C4D4E4F"),
    )
    .map_err(|x| e(&x))?;
    let admin = cms_cardcrypto::diversify(Scheme::GpEmv, &mk, &hex("00010203040506070809"), 1, 24)
        .map_err(|x| e(&x))?;
    let response = cms_cardcrypto::response(&admin, &hex("1603EBDF1C8A2E72")).map_err(|x| e(&x))?;
    check("gp-emv cryptogram", &response, "9CB2DC8314AFA496")?;

    let mk = SecretKey::new(
        KeyAlgorithm::Aes128,
        &hex("404142434445464748494A4B4C4D4E4F"),
    )
    .map_err(|x| e(&x))?;
    let admin = cms_cardcrypto::diversify(
        Scheme::Sp800108Cmac,
        &mk,
        &hex("6F1D2B3C4D5E6F708192A3B4C5D6E7F8"),
        1,
        16,
    )
    .map_err(|x| e(&x))?;
    let response = cms_cardcrypto::response(&admin, &hex("000102030405060708090A0B0C0D0E0F"))
        .map_err(|x| e(&x))?;
    check(
        "sp800-108-cmac cryptogram",
        &response,
        "30B96F7C6A001719C53957054B614C68",
    )?;

    // PIV PUKs, one per PRF (cms_cardcrypto::puk's known answers).
    let card = hex("6F1D2B3C4D5E6F708192A3B4C5D6E7F8");
    for (name, algorithm, want) in [
        ("PIV PUK (AES-CMAC)", KeyAlgorithm::Aes128, "69910623"),
        ("PIV PUK (3DES-CMAC)", KeyAlgorithm::Tdes2Key, "24326921"),
    ] {
        let mk = SecretKey::new(algorithm, &hex("404142434445464748494A4B4C4D4E4F"))
            .map_err(|x| e(&x))?;
        let input = PukInput {
            card_id: &card,
            master_key_version: 1,
            puk_version: 1,
            digits: 8,
        };
        let puk = cms_cardcrypto::derive_puk(&mk, &input).map_err(|x| e(&x))?;
        if puk.expose_digits() != want.as_bytes() {
            return Err(format!("known-answer test {name} failed"));
        }
    }
    Ok(())
}

/// How many known-answer tests [`run`] performs.
pub const TESTS: u32 = 7;

#[cfg(test)]
mod tests {
    #[test]
    fn passes_and_can_be_made_to_fail() {
        super::run(false).unwrap();
        assert!(super::run(true).is_err());
    }
}
