//! Known-answer tests: every vector of tests/data/README.md and tests/data/diversification.json.

mod common;

use cms_cardcrypto::diversify::{gp_kdf3_input, kdd};
use cms_cardcrypto::{
    KeyAlgorithm, Scheme, SecretKey, aes_cmac, aes_ecb_encrypt, checksum, diversify, format_groups,
    gp_derivation_data, parse_with_checksum, response, sp800_108_fixed_input, tdes_ecb_encrypt,
    verify_response,
};
use common::{column, diversification_vectors, expand, hex, note, section, to_hex};

fn master_algorithm(scheme: Scheme, len: usize) -> KeyAlgorithm {
    match scheme {
        Scheme::GpEmv | Scheme::GpVisa2 => KeyAlgorithm::Tdes2Key,
        Scheme::GpKdf3 | Scheme::Sp800108Cmac => {
            KeyAlgorithm::aes_for_len(len).expect("AES master key length")
        }
    }
}

#[test]
fn published_primitive_vectors() {
    let s = section("Primitives");
    let (what, key_col, input_col, output_col) = (
        column(&s, "what"),
        column(&s, "key"),
        column(&s, "input"),
        column(&s, "output"),
    );
    let (mut key, mut input) = (Vec::new(), Vec::new());
    let (mut aes, mut tdes_blocks, mut cmac) = (0, 0, 0);
    for row in &s.rows {
        if row[key_col] != "same" {
            key = expand(&row[key_col]);
        }
        if row[input_col] != "same" {
            input = expand(&row[input_col]);
        }
        let expected = expand(&row[output_col]);
        let name = &row[what];
        if name.starts_with("AES-CMAC") {
            let tag = aes_cmac(&key, &input).expect("cmac");
            assert_eq!(to_hex(&tag[..]), to_hex(&expected), "{name}");
            cmac += 1;
        } else if name.contains("3DES") {
            assert_eq!(input.len(), expected.len(), "{name}");
            let secret = SecretKey::new(KeyAlgorithm::Tdes3Key, &key).expect("3-key 3DES key");
            for (block, out) in input.chunks(8).zip(expected.chunks(8)) {
                let got = tdes_ecb_encrypt(&key, block).expect("3des");
                assert_eq!(to_hex(&got[..]), to_hex(out), "{name}");
                let got = secret.encrypt_block(block).expect("3des via key");
                assert_eq!(to_hex(&got), to_hex(out), "{name}");
                tdes_blocks += 1;
            }
        } else if name.starts_with("AES") {
            let got = aes_ecb_encrypt(&key, &input).expect("aes");
            assert_eq!(to_hex(&got[..]), to_hex(&expected), "{name}");
            let algorithm = KeyAlgorithm::aes_for_len(key.len()).expect("aes key length");
            let secret = SecretKey::new(algorithm, &key).expect("aes key");
            assert_eq!(
                to_hex(&response(&secret, &input).expect("aes")),
                to_hex(&expected)
            );
            aes += 1;
        } else {
            panic!("unrecognised primitive row {name:?}");
        }
    }
    // Guards against the table parser silently skipping rows.
    assert_eq!((aes, tdes_blocks, cmac), (4, 3, 2));
}

#[test]
fn two_key_3des_is_k1_k2_k1() {
    let s = section("Primitives");
    let row = s
        .rows
        .iter()
        .find(|r| r[0].contains("3DES"))
        .expect("3DES row");
    let k3 = expand(&row[column(&s, "key")]);
    let k2: Vec<u8> = k3[..16].to_vec();
    let k121: Vec<u8> = [&k3[..16], &k3[..8]].concat();
    for block in expand(&row[column(&s, "input")]).chunks(8) {
        let two = tdes_ecb_encrypt(&k2, block).expect("2-key");
        let three = tdes_ecb_encrypt(&k121, block).expect("3-key");
        assert_eq!(*two, *three);
        let key = SecretKey::new(KeyAlgorithm::Tdes2Key, &k2).expect("2-key key");
        assert_eq!(&key.encrypt_block(block).expect("2-key")[..], &two[..]);
    }
}

fn admin_key_of(cell: &str) -> SecretKey {
    let bytes = expand(cell);
    let kind = note(cell).expect("algorithm note in admin key cell");
    let algorithm = if kind.starts_with("3DES") {
        match bytes.len() {
            16 => KeyAlgorithm::Tdes2Key,
            24 => KeyAlgorithm::Tdes3Key,
            n => panic!("3DES key of {n} bytes"),
        }
    } else if kind.starts_with("AES") {
        KeyAlgorithm::aes_for_len(bytes.len()).expect("aes")
    } else {
        panic!("unknown key kind {kind:?}");
    };
    SecretKey::new(algorithm, &bytes).expect("key")
}

#[test]
fn minidriver_challenge_response_rows() {
    let s = section("Minidriver");
    let (k, c, r) = (
        column(&s, "admin key"),
        column(&s, "challenge"),
        column(&s, "response"),
    );
    let mut key_cell = String::new();
    for row in &s.rows {
        if row[k] != "same" {
            key_cell = row[k].clone();
        }
        let key = admin_key_of(&key_cell);
        let challenge = hex(&row[c]);
        let expected = hex(&row[r]);
        let got = response(&key, &challenge).expect("response");
        assert_eq!(to_hex(&got), to_hex(&expected), "row {row:?}");
        assert!(verify_response(&key, &challenge, &expected));
        let mut wrong = expected.clone();
        wrong[0] ^= 1;
        assert!(!verify_response(&key, &challenge, &wrong));
    }
    assert_eq!(s.rows.len(), 5);
}

/// The KCV lines are prose: "…; zero key -> 8CA64D, 0102..08 x3 -> B073DC."
#[test]
fn key_check_values() {
    let s = section("Minidriver");
    let start = s.text.find("Key check value").expect("KCV paragraph");
    let para = &s.text[start..];
    let para = &para[..para.find("KCV of an AES key").unwrap_or(para.len())];
    let pieces: Vec<&str> = para.split("->").collect();
    assert!(pieces.len() >= 3, "expected two KCV examples");
    for pair in pieces.windows(2) {
        let desc = pair[0]
            .rsplit([';', ','])
            .next()
            .expect("descriptor")
            .trim();
        let kcv = &pair[1].trim()[..6];
        let bytes = if desc == "zero key" {
            vec![0u8; 24]
        } else {
            expand(desc)
        };
        let key = SecretKey::new(KeyAlgorithm::Tdes3Key, &bytes).expect("3DES key");
        assert_eq!(to_hex(&key.kcv()), kcv, "KCV of {desc}");
        assert!(key.verify_kcv(&hex(kcv)));
        assert!(!key.verify_kcv(&[0, 0, 0]));
        assert!(!key.verify_kcv(&hex(kcv)[..2]));
        assert_eq!(key.kcv(), key.kcv_gp(), "3DES KCV is the same both ways");
        // A 16-byte key K1 K2 used as K1 K2 K1 has the same KCV when K3 == K1.
        if bytes[..8] == bytes[16..] {
            let two = SecretKey::new(KeyAlgorithm::Tdes2Key, &bytes[..16]).expect("2-key");
            assert_eq!(two.kcv(), key.kcv());
        }
    }
}

/// AES KCV = first 3 bytes of E_K(00 x 16): for the zero AES-128 key that block is the value
/// `66E94BD4…` of the checksum table (E_0(0)).
#[test]
fn aes_kcv_is_zero_block_encryption() {
    let s = section("Checksums");
    let e0 = s
        .rows
        .iter()
        .map(|r| hex(&r[0]))
        .find(|v| v.len() == 16)
        .expect("16-byte row");
    let zero = SecretKey::new(KeyAlgorithm::Aes128, &[0u8; 16]).expect("key");
    assert_eq!(&zero.encrypt_block(&[0u8; 16]).expect("aes")[..], &e0[..]);
    assert_eq!(&zero.kcv()[..], &e0[..3]);
}

#[test]
fn checksum_rows_and_catalogue_check() {
    let s = section("Checksums");
    let (v, c) = (column(&s, "value"), column(&s, "checksum"));
    for row in &s.rows {
        let bytes = hex(&row[v]);
        assert_eq!(checksum(&bytes), row[c], "checksum of {}", row[v]);
        // Round trip through what a person sees and types.
        let shown = format_groups(&bytes);
        let typed = shown.to_lowercase().replace(' ', "-");
        let parsed = parse_with_checksum(&typed, &row[c].to_lowercase(), &[8, 16]).expect("parse");
        assert_eq!(&parsed[..], &bytes[..]);
    }
    assert_eq!(s.rows.len(), 5);

    // Catalogue check: over ASCII "123456789": 29B1.
    let marker = "over ASCII \"";
    let at = s.text.find(marker).expect("catalogue check sentence") + marker.len();
    let rest = &s.text[at..];
    let (ascii, rest) = rest.split_once('"').expect("closing quote");
    let value = rest.trim_start_matches(':').trim()[..4].to_owned();
    assert_eq!(checksum(ascii.as_bytes()), value);
}

#[test]
fn format_groups_matches_design_example() {
    let s = section("Minidriver");
    let challenge = hex(&s.rows[0][column(&s, "challenge")]);
    let shown = format_groups(&challenge);
    assert_eq!(shown.replace(' ', ""), to_hex(&challenge));
    assert!(shown.split(' ').all(|g| g.len() == 4));
    assert_eq!(shown.len(), 19);
}

#[test]
fn every_diversification_entry() {
    let vectors = diversification_vectors();
    assert!(!vectors.is_empty());
    for v in &vectors {
        let scheme: Scheme = v.scheme.parse().expect("scheme name");
        assert_eq!(scheme.as_str(), v.scheme);
        let mk = hex(&v.master_key);
        let master = SecretKey::new(master_algorithm(scheme, mk.len()), &mk).expect("master");
        let card_id = hex(&v.card_id);
        let expected = hex(&v.admin_key);
        let admin = diversify(scheme, &master, &card_id, v.key_version, expected.len())
            .unwrap_or_else(|e| panic!("{}: {e}", v.scheme));
        assert_eq!(to_hex(admin.expose_bytes()), v.admin_key, "{}", v.scheme);

        let challenge = hex(&v.challenge);
        let resp = response(&admin, &challenge).expect("response");
        assert_eq!(to_hex(&resp), v.response, "{}", v.scheme);
        assert!(verify_response(&admin, &challenge, &hex(&v.response)));
        assert_eq!(checksum(&challenge), v.challenge_checksum);
        assert_eq!(checksum(&resp), v.response_checksum);
        let typed = parse_with_checksum(&format_groups(&resp), &v.response_checksum, &[8, 16])
            .expect("typed response");
        assert_eq!(&typed[..], &resp[..]);

        // The HSM paths must give the same key as the soft path.
        match scheme {
            Scheme::GpEmv | Scheme::GpVisa2 => {
                assert!(scheme.hsm_ecb_derivable());
                let d = gp_derivation_data(scheme, &card_id).expect("D");
                let k16 = [
                    tdes_ecb_encrypt(&mk, &d[..8]).expect("3des").to_vec(),
                    tdes_ecb_encrypt(&mk, &d[8..]).expect("3des").to_vec(),
                ]
                .concat();
                assert_eq!(&k16[..], &expected[..16]);
                assert_eq!(&expected[16..], &expected[..8], "K16 || K16[0..8]");
                let two = diversify(scheme, &master, &card_id, v.key_version, 16).expect("16");
                assert_eq!(two.algorithm(), KeyAlgorithm::Tdes2Key);
                assert_eq!(two.expose_bytes(), &k16[..]);
                assert_eq!(
                    response(&two, &challenge).expect("2-key response").to_vec(),
                    resp.to_vec()
                );
            }
            Scheme::GpKdf3 => {
                assert!(!scheme.hsm_ecb_derivable());
                let t1 = aes_cmac(&mk, &gp_kdf3_input(&card_id, 1).expect("m")).expect("cmac");
                assert_eq!(&t1[..], &expected[..16]);
            }
            Scheme::Sp800108Cmac => {
                assert!(!scheme.hsm_ecb_derivable());
                let fixed = sp800_108_fixed_input(&card_id, v.key_version, expected.len())
                    .expect("fixed input");
                let k1 = aes_cmac(&mk, &[&1u32.to_be_bytes()[..], &fixed].concat()).expect("k1");
                assert_eq!(&k1[..], &expected[..16]);
            }
        }
    }
    for scheme in Scheme::ALL {
        assert!(
            vectors.iter().any(|v| v.scheme == scheme.as_str()),
            "no vector for {scheme}"
        );
    }
}

/// "The derived keys for MK 404142…4F, KDD 00010203040506070809 match GlobalPlatformPro's
/// published key check values (gp-emv ENC C33013, gp-visa2 ENC 2BE598, gp-kdf3 AES-128 ENC
/// E79C05)." The KCVs are of the derived (admin) keys. GlobalPlatformPro computes an AES KCV over
/// 01 x 16 (SCP03 convention), not over the zero block, hence `kcv_gp`.
#[test]
fn globalplatformpro_key_check_values() {
    let s = section("Per-card");
    let mk_at = s.text.find("for MK ").expect("MK in text") + "for MK ".len();
    let mk_cell = s.text[mk_at..].split(',').next().expect("MK value");
    let mk = expand(mk_cell);
    // The first "KDD " is the definition; the value is the one followed by 20 hex digits.
    let kdd_value = s
        .text
        .match_indices("KDD ")
        .filter_map(|(i, _)| s.text[i + 4..].split([' ', ',']).next())
        .find(|w| w.len() == 20 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .expect("KDD value in text");
    let card_id = hex(kdd_value);
    assert_eq!(
        kdd(&card_id).expect("kdd").to_vec(),
        card_id,
        "already a KDD"
    );

    let open = s.text.find("check values (").expect("KCV list") + "check values (".len();
    let list = &s.text[open..];
    let list = &list[..list.find(')').expect("closing parenthesis")];
    let mut seen = 0;
    for item in list.split(',') {
        let words: Vec<&str> = item.split_whitespace().collect();
        let scheme: Scheme = words[0].parse().expect("scheme in KCV list");
        let kcv = *words.last().expect("kcv");
        let algorithm = master_algorithm(scheme, mk.len());
        let master = SecretKey::new(algorithm, &mk).expect("master");
        let out_len = if scheme.hsm_ecb_derivable() {
            24
        } else {
            mk.len()
        };
        let admin = diversify(scheme, &master, &card_id, 1, out_len).expect("derive");
        assert_eq!(to_hex(&admin.kcv_gp()), kcv, "{scheme}");
        seen += 1;
    }
    assert_eq!(seen, 3);
}
