//! A PIV card's PUK, derived per card from a PUK master key: never stored, never random.
//!
//! A PIV card has no admin-key unblock; its PIN is reset with the PUK. Custody derives each
//! card's PUK from a master key, so nothing per card is kept and the PUK read out of one card
//! says nothing about another's. The PUK carries a version: the agent rotates the card to the
//! next version right after an online use, or at its next online contact after the helpdesk
//! read the PUK out; each version's PUK is unrelated to the others.
//!
//! The derivation is NIST SP 800-108 counter mode with CMAC as the PRF, keyed by the master key
//! (AES-CMAC for an AES master key, TDES-CMAC with 64-bit blocks for a 3DES one), followed by a
//! decimalisation without modulo bias:
//!
//! ```text
//! K(i) = CMAC(MK, [i]_32 || "CMS-PIV-PUK" || 00 || CID || [V]_32 || [P]_32 || [N]_32),  i = 1, 2, …
//! ```
//!
//! * CID: the card identifier, 1 to 64 bytes. It is the only variable-length field, so the
//!   encoding is unambiguous. V: the master key version. P: the PUK version. N: the number of
//!   digits (6 to 8), so a 6-digit PUK is not a prefix of the 8-digit one. `[x]_32`: 32-bit
//!   big-endian.
//! * Digits: the bytes of K(1) || K(2) || … in order; a byte b < 250 gives the digit b mod 10,
//!   a byte of 250 or more is dropped (250 is the largest multiple of 10 that fits a byte, so
//!   each digit is exactly equally likely). Blocks are drawn until N digits are found (at most
//!   [`MAX_PUK_BLOCKS`]). The PUK is those digits as ASCII `'0'..='9'`, as a PIV card takes it.
//!
//! The label `CMS-PIV-PUK` keeps PUKs apart from every admin-key diversification (see
//! [`crate::diversify`](mod@crate::diversify)) under the same master key: `sp800-108-cmac` MACs
//! `[i]_32 || "CMS-ADMIN-KEY" || …` (the labels differ at their fifth byte), `gp-kdf3` MACs
//! 16-byte messages (a PUK message is at least 29 bytes), and `gp-emv` / `gp-visa2` encrypt
//! single 8-byte blocks with the key where a PUK MACs several. No PRF input of a PUK is ever the
//! input of an admin key, so a PUK is independent of every admin key and cryptogram.
//!
//! [`derive_puk`] computes it in software. An HSM computes the same with [`derive_puk_with`],
//! supplying the PRF itself (C_Sign with CKM_AES_CMAC on the master key object, or
//! [`crate::cmac_by_blocks`] over ECB encryptions for a 3DES key): the master key stays inside,
//! only the digits leave.

use std::fmt;
use std::ops::RangeInclusive;

use zeroize::Zeroizing;

use crate::code::checksum;
use crate::diversify::MAX_CARD_ID_LEN;
use crate::primitives::{PrimitiveError, SecretKey, ct_eq};

/// Label of the PUK derivation (SP 800-108 "Label").
pub const PUK_LABEL: &[u8] = b"CMS-PIV-PUK";

/// PUK lengths in digits that a PIV card takes.
pub const PUK_LENGTHS: RangeInclusive<usize> = 6..=8;

/// Most PRF blocks drawn for one PUK. Two blocks suffice all but never (an AES block has 16
/// bytes, each usable with probability 250/256); the bound only stops a broken PRF that
/// returns nothing from looping forever.
pub const MAX_PUK_BLOCKS: u32 = 64;

/// Bytes at or above this are dropped: 250 = 25 × 10 keeps every digit equally likely.
const DIGIT_LIMIT: u8 = 250;

/// Why no PUK was derived. Names lengths, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PukError {
    /// The requested number of digits is not one a PIV card takes.
    #[error("a PUK is 6 to 8 digits, got {got}")]
    Length {
        /// Requested number of digits.
        got: usize,
    },
    /// The card identifier is empty.
    #[error("the card identifier is empty")]
    EmptyCardId,
    /// The card identifier is longer than [`MAX_CARD_ID_LEN`].
    #[error("the card identifier is {got} bytes, at most {max} are accepted")]
    CardIdTooLong {
        /// Supplied length.
        got: usize,
        /// Limit.
        max: usize,
    },
    /// The PRF gave too few usable bytes in [`MAX_PUK_BLOCKS`] blocks (it is broken).
    #[error("the PUK derivation drew {MAX_PUK_BLOCKS} blocks without finding enough digits")]
    Exhausted,
    /// A primitive refused its input (an internal invariant was broken).
    #[error(transparent)]
    Primitive(#[from] PrimitiveError),
}

/// What a PUK is derived from, besides the master key. None of it is secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PukInput<'a> {
    /// The card identifier (1 to 64 bytes).
    pub card_id: &'a [u8],
    /// Version of the master key the PUK is derived under.
    pub master_key_version: u32,
    /// The PUK's own version.
    pub puk_version: u32,
    /// Number of digits (6 to 8).
    pub digits: usize,
}

/// A derived PUK: ASCII digits in zeroizing memory. `Debug` shows only the length.
#[derive(Clone)]
pub struct Puk {
    digits: Zeroizing<Vec<u8>>,
}

impl Puk {
    /// The digits as ASCII bytes (`b"12345678"`), as the card and the user take them. Named so
    /// that every use is visible in review: never log or store them.
    pub fn expose_digits(&self) -> &[u8] {
        &self.digits
    }

    /// Number of digits.
    pub fn digit_count(&self) -> usize {
        self.digits.len()
    }

    /// CRC-16/IBM-3740 of the digit bytes, 4 upper-case hex characters (read out with the PUK
    /// so that a mistyped PUK is caught before it costs one of the card's PUK tries).
    pub fn checksum(&self) -> String {
        checksum(&self.digits)
    }

    /// Constant-time comparison.
    pub fn ct_eq(&self, other: &Puk) -> bool {
        ct_eq(&self.digits, &other.digits)
    }
}

impl fmt::Debug for Puk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Puk")
            .field("digits", &self.digits.len())
            .finish_non_exhaustive()
    }
}

fn check(input: &PukInput<'_>) -> Result<(), PukError> {
    if !PUK_LENGTHS.contains(&input.digits) {
        return Err(PukError::Length { got: input.digits });
    }
    if input.card_id.is_empty() {
        return Err(PukError::EmptyCardId);
    }
    if input.card_id.len() > MAX_CARD_ID_LEN {
        return Err(PukError::CardIdTooLong {
            got: input.card_id.len(),
            max: MAX_CARD_ID_LEN,
        });
    }
    Ok(())
}

/// The SP 800-108 fixed input (everything after the 32-bit counter):
/// `"CMS-PIV-PUK" || 00 || CID || [V]_32 || [P]_32 || [N]_32`.
pub fn puk_fixed_input(input: &PukInput<'_>) -> Result<Vec<u8>, PukError> {
    check(input)?;
    let digits = u32::try_from(input.digits).map_err(|_| PukError::Length { got: input.digits })?;
    let mut fixed = Vec::with_capacity(PUK_LABEL.len() + 1 + input.card_id.len() + 12);
    fixed.extend_from_slice(PUK_LABEL);
    fixed.push(0x00);
    fixed.extend_from_slice(input.card_id);
    fixed.extend_from_slice(&input.master_key_version.to_be_bytes());
    fixed.extend_from_slice(&input.puk_version.to_be_bytes());
    fixed.extend_from_slice(&digits.to_be_bytes());
    Ok(fixed)
}

/// Appends to `out` the digits `block` yields, until `out` holds `want`: bytes below 250 give
/// their value mod 10 as an ASCII digit, the others are dropped.
fn push_digits(out: &mut Vec<u8>, block: &[u8], want: usize) {
    for &byte in block {
        if out.len() >= want {
            return;
        }
        if byte < DIGIT_LIMIT {
            out.push(b'0' + byte % 10);
        }
    }
}

/// Derives the PUK with a caller-supplied PRF: `prf(message)` must return CMAC(MK, message)
/// (see the module documentation), for instance computed by an HSM that holds the master key.
/// The messages are `[i]_32 || fixed input` for i = 1, 2, …, asked for in order.
pub fn derive_puk_with<E>(
    input: &PukInput<'_>,
    mut prf: impl FnMut(&[u8]) -> Result<Zeroizing<Vec<u8>>, E>,
) -> Result<Puk, E>
where
    E: From<PukError>,
{
    let fixed = puk_fixed_input(input)?;
    let mut digits = Zeroizing::new(Vec::with_capacity(input.digits));
    let mut message = Vec::with_capacity(4 + fixed.len());
    for counter in 1..=MAX_PUK_BLOCKS {
        message.clear();
        message.extend_from_slice(&counter.to_be_bytes());
        message.extend_from_slice(&fixed);
        let block = prf(&message)?;
        push_digits(&mut digits, &block, input.digits);
        if digits.len() == input.digits {
            return Ok(Puk { digits });
        }
    }
    Err(PukError::Exhausted.into())
}

/// Derives the PUK in software from the master key (AES-CMAC or TDES-CMAC by its algorithm).
pub fn derive_puk(master: &SecretKey, input: &PukInput<'_>) -> Result<Puk, PukError> {
    derive_puk_with(input, |message| Ok(master.cmac(message)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::primitives::{KeyAlgorithm, aes_cmac};

    fn hex(s: &str) -> Vec<u8> {
        data_encoding::HEXUPPER_PERMISSIVE
            .decode(s.as_bytes())
            .unwrap()
    }

    const MASTER: &str = "404142434445464748494A4B4C4D4E4F";
    const CARD: &str = "6F1D2B3C4D5E6F708192A3B4C5D6E7F8";

    fn input(card: &[u8], puk_version: u32, digits: usize) -> PukInput<'_> {
        PukInput {
            card_id: card,
            master_key_version: 1,
            puk_version,
            digits,
        }
    }

    fn puk(algorithm: KeyAlgorithm, master: &str, input: &PukInput<'_>) -> String {
        let key = SecretKey::new(algorithm, &hex(master)).unwrap();
        let puk = derive_puk(&key, input).unwrap();
        String::from_utf8(puk.expose_digits().to_vec()).unwrap()
    }

    /// Pinned once, and computed independently (Python `cryptography`'s OpenSSL CMAC and the
    /// formula of the module documentation) with the same result.
    #[test]
    fn known_answers() {
        let card = hex(CARD);
        let aes = |v, n| puk(KeyAlgorithm::Aes128, MASTER, &input(&card, v, n));
        assert_eq!(aes(1, 8), "69910623");
        assert_eq!(aes(2, 8), "28367080");
        assert_eq!(aes(1, 6), "885822");
        let tdes = |v, n| puk(KeyAlgorithm::Tdes2Key, MASTER, &input(&card, v, n));
        assert_eq!(tdes(1, 8), "24326921");
        assert_eq!(tdes(2, 8), "46726153");
        assert_eq!(
            puk(
                KeyAlgorithm::Tdes3Key,
                "404142434445464748494A4B4C4D4E4F5051525354555657",
                &input(&card, 1, 8)
            ),
            "18369779"
        );
        assert_eq!(
            puk(
                KeyAlgorithm::Aes256,
                "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F",
                &input(b"card-0001", 7, 7)
            ),
            "5825760"
        );
    }

    #[test]
    fn the_first_block_is_the_documented_message() {
        // K(1) spelled out byte by byte, then decimalised by hand.
        let card = hex(CARD);
        let mut message = hex("00000001");
        message.extend_from_slice(b"CMS-PIV-PUK");
        message.push(0);
        message.extend_from_slice(&card);
        message.extend_from_slice(&hex("00000001"));
        message.extend_from_slice(&hex("00000003"));
        message.extend_from_slice(&hex("00000008"));
        let block = aes_cmac(&hex(MASTER), &message).unwrap();
        let by_hand: Vec<u8> = block
            .iter()
            .filter(|b| **b < 250)
            .map(|b| b'0' + b % 10)
            .take(8)
            .collect();
        assert_eq!(by_hand.len(), 8, "one block was enough for this input");
        let key = SecretKey::new(KeyAlgorithm::Aes128, &hex(MASTER)).unwrap();
        let derived = derive_puk(&key, &input(&card, 3, 8)).unwrap();
        assert_eq!(derived.expose_digits(), &by_hand[..]);
    }

    #[test]
    fn digits_only_of_the_asked_length_and_deterministic() {
        for algorithm in KeyAlgorithm::ALL {
            let master: Vec<u8> = (0..algorithm.key_len()).map(|i| i as u8 ^ 0x5A).collect();
            let key = SecretKey::new(algorithm, &master).unwrap();
            for digits in PUK_LENGTHS {
                for version in 1..20 {
                    let card = format!("card-{version}");
                    let a = derive_puk(&key, &input(card.as_bytes(), version, digits)).unwrap();
                    let b = derive_puk(&key, &input(card.as_bytes(), version, digits)).unwrap();
                    assert_eq!(a.digit_count(), digits);
                    assert!(a.expose_digits().iter().all(u8::is_ascii_digit));
                    assert!(a.ct_eq(&b), "{algorithm}: same input, same PUK");
                    assert_eq!(a.checksum(), checksum(a.expose_digits()));
                }
            }
        }
    }

    #[test]
    fn differs_per_card_per_version_per_master_version_and_per_length() {
        let key = SecretKey::new(KeyAlgorithm::Aes128, &hex(MASTER)).unwrap();
        let base = input(b"card-0001", 1, 8);
        let of = |i: PukInput<'_>| derive_puk(&key, &i).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for version in 1..=200 {
            let p = of(PukInput {
                puk_version: version,
                ..base
            });
            seen.insert(p.expose_digits().to_vec());
        }
        // 200 8-digit PUKs: a collision is possible but would be a 1-in-500,000 event.
        assert_eq!(seen.len(), 200, "each PUK version has its own PUK");
        let reference = of(base);
        assert!(!reference.ct_eq(&of(PukInput {
            card_id: b"card-0002",
            ..base
        })));
        assert!(!reference.ct_eq(&of(PukInput {
            master_key_version: 2,
            ..base
        })));
        // A shorter PUK is not the longer one cut short.
        let six = of(PukInput { digits: 6, ..base });
        assert_ne!(six.expose_digits(), &reference.expose_digits()[..6]);
    }

    #[test]
    fn bytes_from_250_up_are_dropped_not_folded() {
        // A modulo shortcut would turn 250..=255 into 0..=5; they must be skipped.
        let mut out = Vec::new();
        push_digits(&mut out, &[255, 250, 9, 249, 0, 253, 10, 123], 8);
        assert_eq!(out, b"99003");
        // Over every byte value each digit appears exactly 25 times.
        let all: Vec<u8> = (0..=255).collect();
        let mut out = Vec::new();
        push_digits(&mut out, &all, 1_000);
        assert_eq!(out.len(), 250);
        for d in b'0'..=b'9' {
            assert_eq!(out.iter().filter(|c| **c == d).count(), 25, "digit {d}");
        }
        // It stops at the wanted length.
        let mut out = Vec::new();
        push_digits(&mut out, &all, 6);
        assert_eq!(out, b"012345");
    }

    #[test]
    fn more_blocks_are_drawn_while_digits_are_missing() {
        let mut messages = Vec::new();
        let puk = derive_puk_with(&input(b"card", 1, 8), |message: &[u8]| {
            messages.push(message.to_vec());
            // Two unusable blocks, then one with five digits, then plenty.
            Ok::<_, PukError>(Zeroizing::new(match messages.len() {
                1 | 2 => vec![0xFF; 16],
                3 => vec![1, 2, 250, 3, 4, 5, 251],
                _ => vec![7; 16],
            }))
        })
        .unwrap();
        assert_eq!(puk.expose_digits(), b"12345777");
        assert_eq!(messages.len(), 4);
        for (i, message) in messages.iter().enumerate() {
            let counter = u32::try_from(i + 1).unwrap().to_be_bytes();
            assert_eq!(&message[..4], &counter, "counter of block {}", i + 1);
            assert_eq!(&message[4..], &messages[0][4..], "same fixed input");
        }
        // A PRF that never yields a digit ends with an error, not a loop.
        let err = derive_puk_with(&input(b"card", 1, 8), |_: &[u8]| {
            Ok::<_, PukError>(Zeroizing::new(vec![0xFA; 16]))
        })
        .unwrap_err();
        assert_eq!(err, PukError::Exhausted);
    }

    #[test]
    fn refuses_bad_lengths_and_card_ids() {
        let key = SecretKey::new(KeyAlgorithm::Aes128, &hex(MASTER)).unwrap();
        for digits in [0, 5, 9, 16] {
            assert_eq!(
                derive_puk(&key, &input(b"card", 1, digits)).unwrap_err(),
                PukError::Length { got: digits }
            );
        }
        assert_eq!(
            derive_puk(&key, &input(b"", 1, 8)).unwrap_err(),
            PukError::EmptyCardId
        );
        let long = [1u8; 65];
        assert_eq!(
            derive_puk(&key, &input(&long, 1, 8)).unwrap_err(),
            PukError::CardIdTooLong { got: 65, max: 64 }
        );
        derive_puk(&key, &input(&long[..64], 1, 8)).unwrap();
    }

    #[test]
    fn never_an_admin_key_input() {
        // The PUK's PRF messages cannot be those of sp800-108-cmac or gp-kdf3.
        let card = b"card-0001";
        let fixed = puk_fixed_input(&input(card, 1, 6)).unwrap();
        let admin = crate::sp800_108_fixed_input(card, 1, 16).unwrap();
        assert_ne!(fixed[..PUK_LABEL.len()], admin[..PUK_LABEL.len()]);
        assert!(4 + fixed.len() > 16, "longer than every gp-kdf3 message");
    }

    #[test]
    fn debug_shows_no_digits() {
        let key = SecretKey::new(KeyAlgorithm::Aes128, &hex(MASTER)).unwrap();
        let puk = derive_puk(&key, &input(b"card", 1, 8)).unwrap();
        let shown = format!("{puk:?}");
        let digits = std::str::from_utf8(puk.expose_digits()).unwrap();
        assert!(!shown.contains(digits), "{shown}");
        assert_eq!(shown, "Puk { digits: 8, .. }");
    }
}
