//! The System Owner (SO) token's unblock key.
//!
//! The SO token is the way back in when the CMS itself is down: its admin key is generated once at
//! system initialisation, shown once to its holder, and later typed into the agent, which computes
//! the cryptogram locally (same math as [`crate::cryptogram::response`]) with no server involved.
//! So the key must survive being written down and typed back: it is shown as hex groups with one
//! overall checksum, and parsing refuses a mistyped key before it can burn a card try.
//!
//! Randomness comes from the caller (custody's or the agent's CSPRNG) through a fill closure, so
//! this crate stays free of RNG dependencies and deterministic under test.

use std::fmt;

use zeroize::Zeroizing;

use crate::code::{CHECKSUM_DIGITS, CodeError, checksum, format_groups, parse_hex};
use crate::cryptogram::{CryptogramError, response};
use crate::primitives::{KCV_LEN, KeyAlgorithm, KeyError, SecretKey, ct_eq};

/// Separator between the key groups and the checksum in [`SoUnblockKey::display`]; parsing
/// ignores it like any other dash.
pub const CHECKSUM_SEPARATOR: &str = " - ";

/// Why an SO unblock key could not be generated or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SoTokenError {
    /// The typed key is malformed or its checksum does not match.
    #[error("SO unblock key: {0}")]
    Code(#[from] CodeError),
    /// The random source returned bytes no real RNG would (all equal, or 3DES halves that
    /// collapse to single DES): refuse rather than issue a weak key.
    #[error("the random source returned degenerate key material; the SO key was not generated")]
    DegenerateRandom,
    /// Internal length mismatch.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// The SO token's admin ("unblock") key.
#[derive(Clone)]
pub struct SoUnblockKey {
    key: SecretKey,
}

/// True when the bytes cannot have come from a working RNG, or make a 3DES key that is really
/// single DES.
fn degenerate(algorithm: KeyAlgorithm, bytes: &[u8]) -> bool {
    let all_equal = bytes.windows(2).all(|w| w[0] == w[1]);
    let tdes_collapses = algorithm.is_tdes()
        && bytes
            .chunks_exact(8)
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| ct_eq(w[0], w[1]));
    all_equal || tdes_collapses
}

impl SoUnblockKey {
    /// Generates a new key of `algorithm`; `fill_random` must fill its buffer from a CSPRNG.
    pub fn generate(
        algorithm: KeyAlgorithm,
        fill_random: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Self, SoTokenError> {
        let mut bytes = Zeroizing::new(vec![0u8; algorithm.key_len()]);
        fill_random(&mut bytes);
        if degenerate(algorithm, &bytes) {
            return Err(SoTokenError::DegenerateRandom);
        }
        Ok(SoUnblockKey {
            key: SecretKey::from_zeroizing(algorithm, bytes)?,
        })
    }

    /// Wraps an existing key (for example one restored from custody's sealed store).
    pub fn from_secret_key(key: SecretKey) -> Self {
        SoUnblockKey { key }
    }

    /// Reads back what [`SoUnblockKey::display`] showed: the key's hex digits followed by the
    /// 4-digit checksum; spaces and dashes are ignored, lower case is accepted.
    pub fn parse(algorithm: KeyAlgorithm, text: &str) -> Result<Self, SoTokenError> {
        let key_len = algorithm.key_len();
        let all = parse_hex(text, &[key_len + CHECKSUM_DIGITS / 2])?;
        let (key_bytes, typed_checksum) = all.split_at(key_len);
        let computed = checksum(key_bytes);
        let typed = Zeroizing::new(data_encoding::HEXUPPER.encode(typed_checksum));
        if !ct_eq(computed.as_bytes(), typed.as_bytes()) {
            return Err(CodeError::ChecksumMismatch.into());
        }
        Ok(SoUnblockKey {
            key: SecretKey::new(algorithm, key_bytes)?,
        })
    }

    /// The form shown once to the holder: `XXXX XXXX … XXXX - CCCC` (key groups, then the
    /// CRC-16/IBM-3740 checksum of the key bytes).
    pub fn display(&self) -> Zeroizing<String> {
        let bytes = self.key.expose_bytes();
        Zeroizing::new(format!(
            "{}{CHECKSUM_SEPARATOR}{}",
            Zeroizing::new(format_groups(bytes)).as_str(),
            checksum(bytes)
        ))
    }

    /// Checksum of the key bytes (the last group of [`SoUnblockKey::display`]).
    pub fn checksum(&self) -> String {
        checksum(self.key.expose_bytes())
    }

    /// Key check value, for the initialisation record and to confirm a typed key.
    pub fn kcv(&self) -> [u8; KCV_LEN] {
        self.key.kcv()
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.key.algorithm()
    }

    /// The underlying key (e.g. to write it to the SO token's admin-key slot).
    pub fn key(&self) -> &SecretKey {
        &self.key
    }
}

impl fmt::Debug for SoUnblockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoUnblockKey")
            .field("key", &self.key)
            .finish()
    }
}

/// The cryptogram for an SO token's challenge, computed locally by the agent: the same math as
/// [`crate::cryptogram::response`].
pub fn so_cryptogram(
    key: &SoUnblockKey,
    challenge: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptogramError> {
    response(&key.key, challenge)
}
