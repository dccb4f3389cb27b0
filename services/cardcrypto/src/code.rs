//! Codes that people type: challenges, responses, PUKs and the SO unblock key.
//!
//! A wrong response burns one of a card's few admin-key tries, so every code read aloud or typed
//! carries a CRC-16/IBM-3740 checksum (4 upper-case hex characters over the raw bytes) that is
//! checked before anything reaches the card. Codes are shown as upper-case hex in groups of 4
//! (`1603 EBDF 1C8A 2E72`); input ignores spaces (any whitespace) and dashes and accepts lower case.
//!
//! Errors name *what* is wrong (position, length, which check failed) and never echo the typed
//! characters or the expected checksum: the code may be a secret, and an expected checksum would
//! tell a guesser whether a guess was close.

use std::fmt;

use crc::{CRC_16_IBM_3740, Crc};
use data_encoding::HEXUPPER;
use zeroize::{Zeroize, Zeroizing};

use crate::primitives::{ct_eq, lengths};

/// The checksum algorithm: poly 0x1021, init 0xFFFF, no reflection, xorout 0 (check value 29B1).
static CHECKSUM: Crc<u16> = Crc::<u16>::new(&CRC_16_IBM_3740);

/// Number of hex characters in a checksum.
pub const CHECKSUM_DIGITS: usize = 4;

/// Hex digits per display group.
pub const GROUP_DIGITS: usize = 4;

/// What kind of character was found where a hex digit was expected. Coarse on purpose: it helps
/// the user find the typo without revealing the character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CharacterClass {
    /// An ASCII letter outside A-F.
    Letter,
    /// ASCII punctuation or a symbol other than the ignored dash.
    Punctuation,
    /// A control character.
    Control,
    /// Anything outside ASCII (for example a look-alike letter or a non-breaking dash).
    NonAscii,
}

impl fmt::Display for CharacterClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CharacterClass::Letter => "a letter other than A-F",
            CharacterClass::Punctuation => "a punctuation mark",
            CharacterClass::Control => "a control character",
            CharacterClass::NonAscii => "a non-ASCII character",
        })
    }
}

/// Why a typed code was refused. `Display` never contains the typed characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    /// Nothing but separators (or nothing at all) was entered.
    #[error("no code was entered")]
    Empty,
    /// A character is neither a hex digit nor an ignored separator.
    #[error("character {position} is not a hex digit (it is {character_class})")]
    NotHex {
        /// 1-based position in the input as typed, counting separators.
        position: usize,
        /// Rough class of the offending character.
        character_class: CharacterClass,
    },
    /// The number of hex digits is not one of the accepted lengths.
    #[error(
        "the code has {got_digits} hex digits, expected {}",
        lengths(expected_digits)
    )]
    WrongLength {
        /// Hex digits entered (separators not counted).
        got_digits: usize,
        /// Accepted digit counts.
        expected_digits: Vec<usize>,
    },
    /// An odd number of hex digits cannot form whole bytes.
    #[error("the code has an odd number of hex digits ({got_digits})")]
    OddDigits {
        /// Hex digits entered.
        got_digits: usize,
    },
    /// The checksum field is empty or has fewer than 4 hex digits: it was not (fully) typed.
    #[error(
        "the checksum is missing: it is the 4 hex digits shown beside the code, {got_digits} were given"
    )]
    ChecksumMissing {
        /// Hex digits entered in the checksum field.
        got_digits: usize,
    },
    /// The checksum field holds more than 4 hex digits, or a character that is not one.
    #[error("the checksum must be exactly 4 hex digits (0-9, A-F)")]
    ChecksumMalformed,
    /// The code and its checksum do not belong together: a typing error in one of them.
    #[error("the checksum does not match the code; check both for a typing error")]
    ChecksumMismatch,
}

/// True for the characters input parsing skips.
fn is_separator(c: char) -> bool {
    c == '-' || c.is_whitespace()
}

fn classify(c: char) -> CharacterClass {
    if !c.is_ascii() {
        CharacterClass::NonAscii
    } else if c.is_ascii_alphabetic() {
        CharacterClass::Letter
    } else if c.is_ascii_control() {
        CharacterClass::Control
    } else {
        CharacterClass::Punctuation
    }
}

/// Strips separators and validates characters; returns the upper-case digits (zeroizing).
fn normalise(input: &str) -> Result<Zeroizing<Vec<u8>>, CodeError> {
    let mut digits = Zeroizing::new(Vec::with_capacity(input.len()));
    for (index, c) in input.chars().enumerate() {
        if is_separator(c) {
            continue;
        }
        if c.is_ascii_hexdigit() {
            digits.push(c.to_ascii_uppercase() as u8);
        } else {
            return Err(CodeError::NotHex {
                position: index + 1,
                character_class: classify(c),
            });
        }
    }
    if digits.is_empty() {
        return Err(CodeError::Empty);
    }
    Ok(digits)
}

/// Parses a hex code as typed.
///
/// `expected_lengths` lists the accepted lengths in **bytes** (e.g. `&[8, 16]` for a minidriver
/// challenge); an empty slice accepts any whole number of bytes. The result is zeroizing because
/// the code may be a response, a PUK or a key.
pub fn parse_hex(input: &str, expected_lengths: &[usize]) -> Result<Zeroizing<Vec<u8>>, CodeError> {
    let digits = normalise(input)?;
    let got_digits = digits.len();
    if !expected_lengths.is_empty() && !expected_lengths.iter().any(|n| n * 2 == got_digits) {
        return Err(CodeError::WrongLength {
            got_digits,
            expected_digits: expected_lengths.iter().map(|n| n * 2).collect(),
        });
    }
    if got_digits % 2 != 0 {
        return Err(CodeError::OddDigits { got_digits });
    }
    // normalise() let only upper-case hex digits through, an even number of them.
    let mut bytes = Zeroizing::new(vec![0; got_digits / 2]);
    HEXUPPER
        .decode_mut(&digits, &mut bytes)
        .map_err(|_| CodeError::OddDigits { got_digits })?;
    Ok(bytes)
}

/// Parses the 4-hex-character checksum field (separators ignored, any case). An empty or
/// short field is a missing checksum (the user skipped it or stopped early), told apart from
/// a mistyped one.
fn parse_checksum_field(checksum: &str) -> Result<Zeroizing<Vec<u8>>, CodeError> {
    let digits = match normalise(checksum) {
        Ok(digits) => digits,
        Err(CodeError::Empty) => return Err(CodeError::ChecksumMissing { got_digits: 0 }),
        Err(_) => return Err(CodeError::ChecksumMalformed),
    };
    match digits.len() {
        CHECKSUM_DIGITS => Ok(digits),
        short if short < CHECKSUM_DIGITS => Err(CodeError::ChecksumMissing { got_digits: short }),
        _ => Err(CodeError::ChecksumMalformed),
    }
}

/// Parses a code and checks it against its separately typed checksum.
///
/// The code is validated first (so a typo in the code is reported as such), then the checksum
/// field, then the match, compared in constant time.
pub fn parse_with_checksum(
    code: &str,
    checksum: &str,
    expected_lengths: &[usize],
) -> Result<Zeroizing<Vec<u8>>, CodeError> {
    let bytes = parse_hex(code, expected_lengths)?;
    let typed = parse_checksum_field(checksum)?;
    let mut computed = checksum_of(&bytes);
    let ok = ct_eq(computed.as_bytes(), &typed);
    computed.zeroize();
    if ok {
        Ok(bytes)
    } else {
        Err(CodeError::ChecksumMismatch)
    }
}

fn checksum_of(bytes: &[u8]) -> String {
    format!("{:04X}", CHECKSUM.checksum(bytes))
}

/// The 4-character checksum (CRC-16/IBM-3740, upper-case hex) of the raw bytes of a code.
pub fn checksum(bytes: &[u8]) -> String {
    checksum_of(bytes)
}

/// Upper-case hex in groups of 4 separated by single spaces: `1603 EBDF 1C8A 2E72`.
pub fn format_groups(bytes: &[u8]) -> String {
    let mut flat = Zeroizing::new(HEXUPPER.encode(bytes));
    let mut out = String::with_capacity(flat.len() + flat.len() / GROUP_DIGITS);
    for (i, c) in flat.chars().enumerate() {
        if i > 0 && i % GROUP_DIGITS == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    flat.zeroize();
    out
}

/// A parsed code (challenge, response, PUK) with helpers to show it back.
///
/// `Debug` prints only the length, so a code in a struct that gets logged stays private.
#[derive(Clone)]
pub struct TypedCode {
    bytes: Zeroizing<Vec<u8>>,
}

impl TypedCode {
    /// Wraps bytes that came from the card or from custody.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        TypedCode {
            bytes: Zeroizing::new(bytes.to_vec()),
        }
    }

    /// Parses a code typed without a checksum (see [`parse_hex`]).
    pub fn parse(input: &str, expected_lengths: &[usize]) -> Result<Self, CodeError> {
        parse_hex(input, expected_lengths).map(|bytes| TypedCode { bytes })
    }

    /// Parses a code typed with its checksum (see [`parse_with_checksum`]).
    pub fn parse_with_checksum(
        code: &str,
        checksum: &str,
        expected_lengths: &[usize],
    ) -> Result<Self, CodeError> {
        parse_with_checksum(code, checksum, expected_lengths).map(|bytes| TypedCode { bytes })
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True when there are no bytes (never the case for a parsed code).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Display form, `1603 EBDF 1C8A 2E72`.
    pub fn groups(&self) -> Zeroizing<String> {
        Zeroizing::new(format_groups(&self.bytes))
    }

    /// The 4-character checksum.
    pub fn checksum(&self) -> String {
        checksum(&self.bytes)
    }
}

impl fmt::Debug for TypedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedCode")
            .field("len", &self.bytes.len())
            .finish_non_exhaustive()
    }
}
