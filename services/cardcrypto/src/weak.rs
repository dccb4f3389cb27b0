//! Degenerate keys: keys that are valid bytes for their algorithm but much weaker than it
//! promises. A key ceremony refuses them, and a key generator draws again.
//!
//! * Any algorithm: all zeros (components that cancel out, or nobody's secret at all).
//! * 3DES: a weak, semi-weak or possibly-weak DES key among its parts (the `des` crate's
//!   list), and parts that repeat: a 2-key 3DES key with K1 = K2, or a 3-key one with two
//!   equal parts, is single DES (or 2-key 3DES) in disguise.
//!
//! DES ignores the low bit of each byte (parity), so the checks look at keys with parity set;
//! two parts that differ only in parity bits are the same key.

use std::fmt;

use zeroize::Zeroizing;

use crate::primitives::SecretKey;

/// How a key is degenerate. `Display` says what, never which bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Degenerate {
    /// Every byte is zero.
    AllZero,
    /// Two of the DES keys of a 3DES key are equal (parity bits aside).
    RepeatedDesKey,
    /// One of the DES keys of a 3DES key is weak, semi-weak or possibly weak.
    WeakDesKey,
}

impl fmt::Display for Degenerate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Degenerate::AllZero => "it is all zeros",
            Degenerate::RepeatedDesKey => {
                "two of its DES keys are equal (K1 = K2, parity bits aside), which makes it single DES"
            }
            Degenerate::WeakDesKey => "one of its DES keys is a weak or semi-weak DES key",
        })
    }
}

/// DES key bytes with odd parity set in each byte, as the `des` crate's weak-key list has them.
fn with_parity(bytes: &[u8]) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(
        bytes
            .iter()
            .map(|b| {
                let high = b & 0xFE;
                // Odd parity: the low bit makes the count of one bits odd.
                high | u8::from(high.count_ones() % 2 == 0)
            })
            .collect(),
    )
}

/// `Some(why)` when `key` is degenerate; `None` for a usable key.
pub fn degenerate(key: &SecretKey) -> Option<Degenerate> {
    let bytes = key.expose_bytes();
    if bytes.iter().all(|b| *b == 0) {
        return Some(Degenerate::AllZero);
    }
    if !key.algorithm().is_tdes() {
        return None;
    }
    let keyed = with_parity(bytes);
    let parts: Vec<&[u8]> = keyed.chunks_exact(8).collect();
    if parts.iter().any(|part| des::weak_key_test(part).is_err()) {
        return Some(Degenerate::WeakDesKey);
    }
    let repeated = parts
        .iter()
        .enumerate()
        .any(|(i, a)| parts[i + 1..].iter().any(|b| a == b));
    repeated.then_some(Degenerate::RepeatedDesKey)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::primitives::KeyAlgorithm;

    fn key(algorithm: KeyAlgorithm, hex: &str) -> SecretKey {
        let bytes = data_encoding::HEXUPPER_PERMISSIVE
            .decode(hex.as_bytes())
            .unwrap();
        SecretKey::new(algorithm, &bytes).unwrap()
    }

    #[test]
    fn good_keys_pass() {
        for (algorithm, hex) in [
            (KeyAlgorithm::Tdes2Key, "404142434445464748494A4B4C4D4E4F"),
            (
                KeyAlgorithm::Tdes3Key,
                "0123456789ABCDEFFEDCBA987654321089ABCDEF01234567",
            ),
            (KeyAlgorithm::Aes128, "00000000000000000000000000000001"),
            (KeyAlgorithm::Aes128, "42424242424242424242424242424242"),
        ] {
            assert_eq!(degenerate(&key(algorithm, hex)), None, "{hex}");
        }
    }

    #[test]
    fn degenerate_keys_are_named() {
        use Degenerate::*;
        for (algorithm, hex, why) in [
            (KeyAlgorithm::Aes256, &"00".repeat(32)[..], AllZero),
            (KeyAlgorithm::Tdes2Key, &"00".repeat(16), AllZero),
            // K1 = K2, also when only parity bits differ.
            (
                KeyAlgorithm::Tdes2Key,
                "0123456789ABCDEF0123456789ABCDEF",
                RepeatedDesKey,
            ),
            (
                KeyAlgorithm::Tdes2Key,
                "0123456789ABCDEF0022446688AACCEE",
                RepeatedDesKey,
            ),
            (
                KeyAlgorithm::Tdes3Key,
                "0123456789ABCDEFFEDCBA98765432100123456789ABCDEF",
                RepeatedDesKey,
            ),
            // Weak (also without parity: 00.. is 01.. to DES) and semi-weak halves.
            (
                KeyAlgorithm::Tdes2Key,
                "01010101010101010123456789ABCDEF",
                WeakDesKey,
            ),
            (
                KeyAlgorithm::Tdes2Key,
                "0123456789ABCDEF0000000000000000",
                WeakDesKey,
            ),
            (
                KeyAlgorithm::Tdes2Key,
                "E0E0E0E0F1F1F1F10123456789ABCDEF",
                WeakDesKey,
            ),
            (
                KeyAlgorithm::Tdes2Key,
                "0123456789ABCDEF011F011F010E010E",
                WeakDesKey,
            ),
            (
                KeyAlgorithm::Tdes2Key,
                "FE01FE01FE01FE010123456789ABCDEF",
                WeakDesKey,
            ),
        ] {
            assert_eq!(degenerate(&key(algorithm, hex)), Some(why), "{hex}");
            assert!(!why.to_string().contains(&hex[..6]));
        }
    }

    #[test]
    fn parity_is_odd() {
        let fixed = with_parity(&[0x00, 0x01, 0xFE, 0x1E, 0x0F]);
        assert_eq!(&fixed[..], &[0x01, 0x01, 0xFE, 0x1F, 0x0E]);
        assert!(fixed.iter().all(|b| b.count_ones() % 2 == 1));
    }
}
