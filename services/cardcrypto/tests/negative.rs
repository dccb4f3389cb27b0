//! Refusals: wrong lengths, typos, bad checksums, unsuitable keys; and that neither errors nor
//! Debug output ever show secret digits.

mod common;

use cms_cardcrypto::code::CharacterClass;
use cms_cardcrypto::{
    CodeError, CryptogramError, DiversifyError, KeyAlgorithm, Scheme, SecretKey, SoTokenError,
    SoUnblockKey, TypedCode, checksum, diversify, format_groups, gp_derivation_data, parse_hex,
    parse_with_checksum, response, so_cryptogram, sp800_108_fixed_input, verify_response,
};
use common::{column, diversification_vectors, expand, hex, section, to_hex, windows};

/// Asserts that `message` shares no run of 4 hex digits with `secret` (ignoring case and
/// separators), and does not contain the input as typed.
fn assert_no_secret(message: &str, typed: &str) {
    assert!(
        typed.is_empty() || !message.contains(typed),
        "{message:?} echoes the input"
    );
    let secret: String = typed
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect::<String>()
        .to_uppercase();
    let upper = message.to_uppercase();
    if secret.len() >= 4 {
        for w in windows(&secret, 4) {
            assert!(
                !upper.contains(&w),
                "{message:?} contains secret digits {w}"
            );
        }
    }
}

fn minidriver_key_and_challenge() -> (SecretKey, Vec<u8>, String) {
    let s = section("Minidriver");
    let row = &s.rows[2]; // the factory-default 3DES key, a realistic secret
    let key = SecretKey::new(
        KeyAlgorithm::Tdes3Key,
        &expand(&row[column(&s, "admin key")]),
    )
    .expect("key");
    (
        key,
        hex(&row[column(&s, "challenge")]),
        row[column(&s, "response")].clone(),
    )
}

#[test]
fn wrong_challenge_lengths_are_refused_with_lengths_only() {
    let (tdes, challenge, _) = minidriver_key_and_challenge();
    let aes = SecretKey::new(KeyAlgorithm::Aes128, &[7u8; 16]).expect("aes");
    let long = [challenge.clone(), challenge.clone()].concat();
    let cases: [(&SecretKey, &[u8], usize, usize); 5] = [
        (&tdes, &long, 8, 16),
        (&tdes, &challenge[..7], 8, 7),
        (&tdes, &[], 8, 0),
        (&aes, &challenge, 16, 8),
        (&aes, &[0u8; 32], 16, 32),
    ];
    for (key, chal, expected, got) in cases {
        let err = response(key, chal).expect_err("must refuse");
        assert_eq!(
            err,
            CryptogramError::ChallengeLength {
                algorithm: key.algorithm(),
                expected,
                got
            }
        );
        let msg = err.to_string();
        assert!(msg.contains(&expected.to_string()) && msg.contains(&got.to_string()));
        assert_no_secret(&msg, &to_hex(chal));
        assert!(!verify_response(key, chal, &[0u8; 8]));
    }
    // A response of the wrong length never verifies.
    let good = response(&tdes, &challenge).expect("ok");
    assert!(!verify_response(&tdes, &challenge, &good[..7]));
    assert!(!verify_response(
        &tdes,
        &challenge,
        &[&good[..], &[0]].concat()
    ));
}

#[test]
fn non_hex_input_names_position_and_class_only() {
    let (_, _, resp) = minidriver_key_and_challenge();
    let shown = format_groups(&hex(&resp)); // "F940 6715 12CD 0DFF"
    let cases = [
        (
            format!("{}X{}", &shown[..3], &shown[4..]),
            4,
            CharacterClass::Letter,
        ),
        (format!("{}O", &shown[..18]), 19, CharacterClass::Letter),
        (
            format!("{}.{}", &shown[..5], &shown[6..]),
            6,
            CharacterClass::Punctuation,
        ),
        (
            format!("{}_{}", &shown[..4], &shown[5..]),
            5,
            CharacterClass::Punctuation,
        ),
        (
            format!("{}\u{2013}{}", &shown[..4], &shown[5..]),
            5,
            CharacterClass::NonAscii,
        ),
        (
            format!("{}\u{0}{}", &shown[..4], &shown[5..]),
            5,
            CharacterClass::Control,
        ),
    ];
    for (input, position, class) in cases {
        let err = parse_hex(&input, &[8]).expect_err("must refuse");
        assert_eq!(
            err,
            CodeError::NotHex {
                position,
                character_class: class
            },
            "{input:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&format!("character {position} ")), "{msg}");
        assert_no_secret(&msg, &input);
        assert_no_secret(&format!("{err:?}"), &input);
        // Same through the checksum path.
        let err = parse_with_checksum(&input, &checksum(&hex(&resp)), &[8]).expect_err("refuse");
        assert_no_secret(&err.to_string(), &input);
    }
}

#[test]
fn separators_and_case_are_ignored() {
    let (_, _, resp) = minidriver_key_and_challenge();
    let bytes = hex(&resp);
    let variants = [
        resp.clone(),
        resp.to_lowercase(),
        format_groups(&bytes),
        format_groups(&bytes).replace(' ', "-"),
        format!("  {} \t\n", format_groups(&bytes).to_lowercase()),
    ];
    for v in variants {
        assert_eq!(
            &parse_hex(&v, &[8, 16]).expect("parse")[..],
            &bytes[..],
            "{v:?}"
        );
        let code = TypedCode::parse_with_checksum(&v, &checksum(&bytes).to_lowercase(), &[8])
            .expect("typed");
        assert_eq!(code.as_bytes(), &bytes[..]);
        assert_eq!(*code.groups(), format_groups(&bytes));
        assert_eq!(code.checksum(), checksum(&bytes));
    }
}

#[test]
fn bad_checksum_is_refused_without_revealing_the_right_one() {
    for v in diversification_vectors() {
        let resp = hex(&v.response);
        let right = checksum(&resp);
        assert_eq!(right, v.response_checksum);
        // Every single-digit change of the checksum is caught (CRC-16 detects all of them).
        for i in 0..4 {
            for d in "0123456789ABCDEF".chars() {
                let mut typed: Vec<char> = right.chars().collect();
                if typed[i] == d {
                    continue;
                }
                typed[i] = d;
                let typed: String = typed.into_iter().collect();
                let err = parse_with_checksum(&v.response, &typed, &[8, 16])
                    .expect_err("mismatch must be refused");
                assert_eq!(err, CodeError::ChecksumMismatch);
                let msg = err.to_string();
                assert!(!msg.contains(&right), "{msg} reveals the right checksum");
                assert!(!msg.contains(&typed));
                assert_no_secret(&msg, &v.response);
            }
        }
        // A single-digit typo in the code is caught too.
        let mut code: Vec<char> = v.response.chars().collect();
        code[3] = if code[3] == '0' { '1' } else { '0' };
        let code: String = code.into_iter().collect();
        assert_eq!(
            parse_with_checksum(&code, &right, &[8, 16]),
            Err(CodeError::ChecksumMismatch)
        );
    }
}

#[test]
fn malformed_checksums() {
    let (_, _, resp) = minidriver_key_and_challenge();
    for bad in ["9D700", "9D7G", "9D7\u{00D8}"] {
        let err = parse_with_checksum(&resp, bad, &[8]).expect_err("malformed");
        assert_eq!(err, CodeError::ChecksumMalformed, "{bad:?}");
        assert_no_secret(&err.to_string(), &resp);
    }
    // Empty or short: missing, told apart from a typo.
    for (bad, got_digits) in [("", 0), ("  ", 0), ("9D7", 3), ("9-D", 2)] {
        let err = parse_with_checksum(&resp, bad, &[8]).expect_err("missing");
        assert_eq!(err, CodeError::ChecksumMissing { got_digits }, "{bad:?}");
        assert_no_secret(&err.to_string(), &resp);
    }
}

#[test]
fn lengths_odd_digits_and_empty() {
    let (_, challenge, resp) = minidriver_key_and_challenge();
    let digits = resp.len();
    // Too short by one digit against a fixed length: the length is named.
    let short = &resp[..digits - 1];
    let err = parse_hex(short, &[8]).expect_err("short");
    assert_eq!(
        err,
        CodeError::WrongLength {
            got_digits: 15,
            expected_digits: vec![16]
        }
    );
    assert_eq!(err.to_string(), "the code has 15 hex digits, expected 16");
    assert_no_secret(&err.to_string(), short);

    let err = parse_hex(&format!("{resp}{resp}00"), &[8, 16]).expect_err("long");
    assert_eq!(
        err.to_string(),
        "the code has 34 hex digits, expected 16 or 32"
    );
    assert_no_secret(&err.to_string(), &resp);

    // With no fixed length, an odd count is its own error.
    let err = parse_hex(short, &[]).expect_err("odd");
    assert_eq!(err, CodeError::OddDigits { got_digits: 15 });
    assert_no_secret(&err.to_string(), short);

    for empty in ["", "   ", "- -", "\t"] {
        assert_eq!(parse_hex(empty, &[8]), Err(CodeError::Empty));
        assert_eq!(
            parse_with_checksum(empty, &checksum(&challenge), &[8]),
            Err(CodeError::Empty)
        );
    }
}

#[test]
fn debug_never_prints_key_bytes() {
    for v in diversification_vectors() {
        let scheme: Scheme = v.scheme.parse().expect("scheme");
        let mk = hex(&v.master_key);
        let algorithm = match scheme {
            Scheme::GpEmv | Scheme::GpVisa2 => KeyAlgorithm::Tdes2Key,
            _ => KeyAlgorithm::aes_for_len(mk.len()).expect("aes"),
        };
        let master = SecretKey::new(algorithm, &mk).expect("mk");
        let admin = diversify(
            scheme,
            &master,
            &hex(&v.card_id),
            v.key_version,
            v.admin_key.len() / 2,
        )
        .expect("admin");
        let resp = response(&admin, &hex(&v.challenge)).expect("resp");
        let parsed = parse_hex(&v.admin_key, &[]).expect("parse");
        let code = TypedCode::parse(&v.response, &[8, 16]).expect("code");
        let so = SoUnblockKey::from_secret_key(admin.clone());
        let debug = [
            format!("{master:?}"),
            format!("{admin:?}"),
            format!("{admin:#?}"),
            format!("{resp:?}"),
            format!("{parsed:?}"),
            format!("{code:?}"),
            format!("{so:?}"),
            format!("{:?}", so.display()),
        ];
        for d in &debug {
            for secret in [&v.master_key, &v.admin_key, &v.response] {
                for w in windows(secret, 8) {
                    assert!(!d.to_uppercase().contains(&w), "{d} shows key bytes");
                }
            }
            // Nor as decimal byte lists.
            for bytes in [&mk[..], admin.expose_bytes()] {
                let list = format!("{:?}", &bytes[..4]);
                assert!(
                    !d.contains(list.trim_end_matches(']')),
                    "{d} shows key bytes"
                );
            }
        }
        let shown = format!("{admin:?}");
        assert!(shown.contains(&format!("{:?}", admin.algorithm())));
        assert!(shown.contains(&to_hex(&admin.kcv())));
    }
}

#[test]
fn diversify_refusals() {
    let v = diversification_vectors();
    let tdes_mk = SecretKey::new(KeyAlgorithm::Tdes2Key, &hex(&v[0].master_key)).expect("mk");
    let aes_mk = SecretKey::new(KeyAlgorithm::Aes128, &hex(&v[0].master_key)).expect("mk");
    let tdes3 = SecretKey::new(KeyAlgorithm::Tdes3Key, &[0x11; 24]).expect("mk");
    let cid = hex(&v[0].card_id);

    for (scheme, key) in [
        (Scheme::GpEmv, &aes_mk),
        (Scheme::GpVisa2, &tdes3),
        (Scheme::GpKdf3, &tdes_mk),
        (Scheme::Sp800108Cmac, &tdes3),
    ] {
        let err = diversify(scheme, key, &cid, 1, 16).expect_err("algorithm");
        assert_eq!(
            err,
            DiversifyError::MasterKeyAlgorithm {
                scheme,
                got: key.algorithm()
            }
        );
        assert!(err.to_string().contains(scheme.as_str()));
        assert_no_secret(&err.to_string(), &v[0].master_key);
    }
    assert_eq!(
        diversify(Scheme::GpEmv, &tdes_mk, &[], 1, 24).err(),
        Some(DiversifyError::EmptyCardId)
    );
    assert_eq!(
        diversify(Scheme::Sp800108Cmac, &aes_mk, &[1; 65], 1, 16).err(),
        Some(DiversifyError::CardIdTooLong { got: 65, max: 64 })
    );
    for (scheme, key, len) in [
        (Scheme::GpEmv, &tdes_mk, 8),
        (Scheme::GpVisa2, &tdes_mk, 32),
        (Scheme::GpKdf3, &aes_mk, 32),
        (Scheme::Sp800108Cmac, &aes_mk, 20),
        (Scheme::Sp800108Cmac, &aes_mk, 0),
        (Scheme::Sp800108Cmac, &aes_mk, 48),
    ] {
        let err = diversify(scheme, key, &cid, 1, len).expect_err("length");
        assert!(matches!(err, DiversifyError::OutputLength { got, .. } if got == len));
    }
    assert!(matches!(
        gp_derivation_data(Scheme::Sp800108Cmac, &cid),
        Err(DiversifyError::NotApplicable { .. })
    ));
    assert_eq!(
        sp800_108_fixed_input(&[], 1, 16),
        Err(DiversifyError::EmptyCardId)
    );
    assert_eq!(
        "gp-emv ".parse::<Scheme>(),
        Err(DiversifyError::UnknownScheme)
    );
    assert_eq!(
        "GP-EMV".parse::<Scheme>(),
        Err(DiversifyError::UnknownScheme)
    );
    for scheme in Scheme::ALL {
        assert_eq!(scheme.as_str().parse::<Scheme>(), Ok(scheme));
    }
}

#[test]
fn short_card_ids_are_left_padded() {
    let v = diversification_vectors();
    let mk = SecretKey::new(KeyAlgorithm::Tdes2Key, &hex(&v[0].master_key)).expect("mk");
    let cid = hex(&v[0].card_id); // 10 bytes 00..09: leading 00 is padding-equivalent
    let short = &cid[1..];
    let a = diversify(Scheme::GpEmv, &mk, &cid, 1, 24).expect("a");
    let b = diversify(Scheme::GpEmv, &mk, short, 1, 24).expect("b");
    assert!(a.ct_eq(&b));
    // Longer ids use their rightmost 10 bytes.
    let long = [&[0xAA, 0xBB][..], &cid[..]].concat();
    let c = diversify(Scheme::GpVisa2, &mk, &long, 1, 24).expect("c");
    let d = diversify(Scheme::GpVisa2, &mk, &cid, 1, 24).expect("d");
    assert!(c.ct_eq(&d));
    // The key version is bound only in sp800-108-cmac.
    let e = diversify(Scheme::GpEmv, &mk, &cid, 7, 24).expect("e");
    assert!(a.ct_eq(&e));
    let aes = SecretKey::new(KeyAlgorithm::Aes128, &hex(&v[0].master_key)).expect("aes");
    let f = diversify(Scheme::Sp800108Cmac, &aes, &cid, 1, 16).expect("f");
    let g = diversify(Scheme::Sp800108Cmac, &aes, &cid, 2, 16).expect("g");
    assert!(!f.ct_eq(&g));
}

#[test]
fn key_construction_checks_length() {
    for algorithm in KeyAlgorithm::ALL {
        let n = algorithm.key_len();
        assert!(SecretKey::new(algorithm, &vec![1; n]).is_ok());
        for bad in [0, n - 1, n + 1] {
            let err = SecretKey::new(algorithm, &vec![0x5A; bad]).expect_err("length");
            assert!(err.to_string().contains(&n.to_string()));
            assert!(!err.to_string().contains("5A"));
        }
        assert_eq!(algorithm.as_str().parse::<KeyAlgorithm>(), Ok(algorithm));
    }
    assert!("des".parse::<KeyAlgorithm>().is_err());
}

#[test]
fn so_token_round_trip() {
    let (_, challenge, _) = minidriver_key_and_challenge();
    let mut counter = 0u8;
    let mut rng = |buf: &mut [u8]| {
        for b in buf.iter_mut() {
            counter = counter.wrapping_mul(31).wrapping_add(17);
            *b = counter;
        }
    };
    for algorithm in KeyAlgorithm::ALL {
        let so = SoUnblockKey::generate(algorithm, &mut rng).expect("generate");
        let shown = so.display();
        let (groups, sum) = shown.split_once(" - ").expect("separator");
        assert_eq!(sum, so.checksum());
        assert!(groups.split(' ').all(|g| g.len() == 4));
        let back = SoUnblockKey::parse(algorithm, &shown).expect("parse display");
        assert!(back.key().ct_eq(so.key()));
        assert_eq!(back.kcv(), so.kcv());
        let lower = SoUnblockKey::parse(algorithm, &shown.to_lowercase().replace(' ', ""))
            .expect("parse compact");
        assert!(lower.key().ct_eq(so.key()));

        let chal = if algorithm.is_tdes() {
            challenge.clone()
        } else {
            [challenge.clone(), challenge.clone()].concat()
        };
        let local = so_cryptogram(&back, &chal).expect("cryptogram");
        assert_eq!(
            &local[..],
            &response(so.key(), &chal).expect("same math")[..]
        );

        // A typo anywhere is refused, and the message shows nothing of the key.
        let mut typo: Vec<char> = shown.chars().collect();
        typo[0] = if typo[0] == '0' { '1' } else { '0' };
        let typo: String = typo.into_iter().collect();
        let err = SoUnblockKey::parse(algorithm, &typo).expect_err("typo");
        assert_eq!(err, SoTokenError::Code(CodeError::ChecksumMismatch));
        assert_no_secret(&err.to_string(), &typo);
        let err = SoUnblockKey::parse(algorithm, &shown[..shown.len() - 1]).expect_err("short");
        assert!(matches!(
            err,
            SoTokenError::Code(CodeError::WrongLength { .. })
        ));
        assert_no_secret(&err.to_string(), &shown[..shown.len() - 1]);
    }
}

#[test]
fn so_token_refuses_degenerate_randomness() {
    for algorithm in KeyAlgorithm::ALL {
        let err =
            SoUnblockKey::generate(algorithm, &mut |b: &mut [u8]| b.fill(0)).expect_err("zeros");
        assert_eq!(err, SoTokenError::DegenerateRandom);
    }
    // 3DES with K1 == K2 is single DES.
    let err = SoUnblockKey::generate(KeyAlgorithm::Tdes2Key, &mut |b: &mut [u8]| {
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i % 8) as u8 + 1;
        }
    })
    .expect_err("K1 == K2");
    assert_eq!(err, SoTokenError::DegenerateRandom);
}
