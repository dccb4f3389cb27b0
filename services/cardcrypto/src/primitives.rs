//! Block-cipher primitives and the key type that carries secret bytes.
//!
//! Everything above this module (diversification, cryptograms, the SO token) is built from four
//! operations: one ECB block of 3DES, one ECB block of AES, AES-CMAC, and the key check value. They
//! live here, behind length-checked functions, so that no other module touches the RustCrypto
//! traits and every intermediate that could hold key material ends up in a zeroizing buffer.

use std::fmt;
use std::str::FromStr;

use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};
use aes::{Aes128, Aes192, Aes256};
use cmac::{Cmac, Mac};
use des::{TdesEde2, TdesEde3};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

/// 3DES block length in bytes.
pub const TDES_BLOCK_LEN: usize = 8;
/// AES block length in bytes.
pub const AES_BLOCK_LEN: usize = 16;
/// Length of a key check value in bytes.
pub const KCV_LEN: usize = 3;

/// Errors of the primitives: only lengths are ever reported, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrimitiveError {
    /// The key has a length the algorithm cannot use.
    #[error("{algorithm} key must be {} bytes, got {got}", lengths(expected))]
    KeyLength {
        /// Algorithm name, e.g. `3DES`.
        algorithm: &'static str,
        /// Accepted key lengths in bytes.
        expected: &'static [usize],
        /// Length that was supplied.
        got: usize,
    },
    /// The data block does not match the cipher's block length.
    #[error("{algorithm} block must be {expected} bytes, got {got}")]
    BlockLength {
        /// Algorithm name, e.g. `AES`.
        algorithm: &'static str,
        /// Block length of the cipher.
        expected: usize,
        /// Length that was supplied.
        got: usize,
    },
}

/// Renders `[16, 24]` as `16 or 24` for error messages.
pub(crate) fn lengths(values: &[usize]) -> String {
    match values {
        [] => "of any length".to_owned(),
        [one] => one.to_string(),
        [init @ .., last] => {
            let init: Vec<String> = init.iter().map(ToString::to_string).collect();
            format!("{} or {last}", init.join(", "))
        }
    }
}

/// Encrypts `block` in place with cipher `C` keyed by `key`.
fn encrypt_in_place<C: BlockCipherEncrypt + KeyInit>(
    key: &[u8],
    block: &mut [u8],
    algorithm: &'static str,
    key_lengths: &'static [usize],
) -> Result<(), PrimitiveError> {
    let cipher = C::new_from_slice(key).map_err(|_| PrimitiveError::KeyLength {
        algorithm,
        expected: key_lengths,
        got: key.len(),
    })?;
    let got = block.len();
    let block: &mut Array<u8, C::BlockSize> =
        block.try_into().map_err(|_| PrimitiveError::BlockLength {
            algorithm,
            expected: <C::BlockSize as aes::cipher::typenum::Unsigned>::USIZE,
            got,
        })?;
    cipher.encrypt_block(block);
    Ok(())
}

const TDES_KEY_LENGTHS: &[usize] = &[16, 24];
const AES_KEY_LENGTHS: &[usize] = &[16, 24, 32];

/// 3DES (EDE) encryption of one 8-byte block in ECB mode.
///
/// A 16-byte key is used as K1 K2 K1 (2-key 3DES), a 24-byte key as K1 K2 K3 (3-key 3DES).
/// The output is zeroizing because in key derivation it *is* key material.
pub fn tdes_ecb_encrypt(
    key: &[u8],
    block: &[u8],
) -> Result<Zeroizing<[u8; TDES_BLOCK_LEN]>, PrimitiveError> {
    let mut out = Zeroizing::new([0u8; TDES_BLOCK_LEN]);
    if block.len() != TDES_BLOCK_LEN {
        return Err(PrimitiveError::BlockLength {
            algorithm: "3DES",
            expected: TDES_BLOCK_LEN,
            got: block.len(),
        });
    }
    out.copy_from_slice(block);
    match key.len() {
        16 => encrypt_in_place::<TdesEde2>(key, &mut out[..], "3DES", TDES_KEY_LENGTHS)?,
        24 => encrypt_in_place::<TdesEde3>(key, &mut out[..], "3DES", TDES_KEY_LENGTHS)?,
        got => {
            return Err(PrimitiveError::KeyLength {
                algorithm: "3DES",
                expected: TDES_KEY_LENGTHS,
                got,
            });
        }
    }
    Ok(out)
}

/// AES-128/192/256 encryption of one 16-byte block in ECB mode (key length picks the variant).
pub fn aes_ecb_encrypt(
    key: &[u8],
    block: &[u8],
) -> Result<Zeroizing<[u8; AES_BLOCK_LEN]>, PrimitiveError> {
    let mut out = Zeroizing::new([0u8; AES_BLOCK_LEN]);
    if block.len() != AES_BLOCK_LEN {
        return Err(PrimitiveError::BlockLength {
            algorithm: "AES",
            expected: AES_BLOCK_LEN,
            got: block.len(),
        });
    }
    out.copy_from_slice(block);
    match key.len() {
        16 => encrypt_in_place::<Aes128>(key, &mut out[..], "AES", AES_KEY_LENGTHS)?,
        24 => encrypt_in_place::<Aes192>(key, &mut out[..], "AES", AES_KEY_LENGTHS)?,
        32 => encrypt_in_place::<Aes256>(key, &mut out[..], "AES", AES_KEY_LENGTHS)?,
        got => {
            return Err(PrimitiveError::KeyLength {
                algorithm: "AES",
                expected: AES_KEY_LENGTHS,
                got,
            });
        }
    }
    Ok(out)
}

fn cmac_with<C>(
    key: &[u8],
    message: &[u8],
) -> Result<Zeroizing<[u8; AES_BLOCK_LEN]>, PrimitiveError>
where
    Cmac<C>: KeyInit + Mac,
    C: cmac::block_api::CmacCipher,
{
    let mut mac =
        <Cmac<C> as KeyInit>::new_from_slice(key).map_err(|_| PrimitiveError::KeyLength {
            algorithm: "AES-CMAC",
            expected: AES_KEY_LENGTHS,
            got: key.len(),
        })?;
    Mac::update(&mut mac, message);
    let mut tag = mac.finalize().into_bytes();
    let mut out = Zeroizing::new([0u8; AES_BLOCK_LEN]);
    out.copy_from_slice(&tag[..]);
    tag[..].zeroize();
    Ok(out)
}

/// AES-CMAC (NIST SP 800-38B, RFC 4493) over `message`; the key length picks AES-128/192/256.
pub fn aes_cmac(
    key: &[u8],
    message: &[u8],
) -> Result<Zeroizing<[u8; AES_BLOCK_LEN]>, PrimitiveError> {
    match key.len() {
        16 => cmac_with::<Aes128>(key, message),
        24 => cmac_with::<Aes192>(key, message),
        32 => cmac_with::<Aes256>(key, message),
        got => Err(PrimitiveError::KeyLength {
            algorithm: "AES-CMAC",
            expected: AES_KEY_LENGTHS,
            got,
        }),
    }
}

/// The key algorithms the CMS knows: the admin-key types of minidriver and PIV cards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    /// 2-key 3DES (16 bytes, used as K1 K2 K1).
    Tdes2Key,
    /// 3-key 3DES (24 bytes, K1 K2 K3): the usual minidriver admin key.
    Tdes3Key,
    /// AES-128.
    Aes128,
    /// AES-192.
    Aes192,
    /// AES-256.
    Aes256,
}

impl KeyAlgorithm {
    /// Every algorithm, for menus and exhaustive tests.
    pub const ALL: [KeyAlgorithm; 5] = [
        KeyAlgorithm::Tdes2Key,
        KeyAlgorithm::Tdes3Key,
        KeyAlgorithm::Aes128,
        KeyAlgorithm::Aes192,
        KeyAlgorithm::Aes256,
    ];

    /// Key length in bytes.
    pub const fn key_len(self) -> usize {
        match self {
            KeyAlgorithm::Tdes2Key | KeyAlgorithm::Aes128 => 16,
            KeyAlgorithm::Tdes3Key | KeyAlgorithm::Aes192 => 24,
            KeyAlgorithm::Aes256 => 32,
        }
    }

    /// Cipher block length in bytes: also the length of a card challenge for this key.
    pub const fn block_len(self) -> usize {
        if self.is_tdes() {
            TDES_BLOCK_LEN
        } else {
            AES_BLOCK_LEN
        }
    }

    /// True for the 3DES variants.
    pub const fn is_tdes(self) -> bool {
        matches!(self, KeyAlgorithm::Tdes2Key | KeyAlgorithm::Tdes3Key)
    }

    /// True for the AES variants.
    pub const fn is_aes(self) -> bool {
        !self.is_tdes()
    }

    /// The AES variant for a key length (16, 24 or 32 bytes).
    pub const fn aes_for_len(len: usize) -> Option<KeyAlgorithm> {
        match len {
            16 => Some(KeyAlgorithm::Aes128),
            24 => Some(KeyAlgorithm::Aes192),
            32 => Some(KeyAlgorithm::Aes256),
            _ => None,
        }
    }

    /// Stable configuration name (`3des-2key`, `3des-3key`, `aes-128`, `aes-192`, `aes-256`).
    pub const fn as_str(self) -> &'static str {
        match self {
            KeyAlgorithm::Tdes2Key => "3des-2key",
            KeyAlgorithm::Tdes3Key => "3des-3key",
            KeyAlgorithm::Aes128 => "aes-128",
            KeyAlgorithm::Aes192 => "aes-192",
            KeyAlgorithm::Aes256 => "aes-256",
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An algorithm name that is not one of [`KeyAlgorithm::as_str`]'s values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown key algorithm; expected one of 3des-2key, 3des-3key, aes-128, aes-192, aes-256")]
pub struct UnknownAlgorithm;

impl FromStr for KeyAlgorithm {
    type Err = UnknownAlgorithm;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyAlgorithm::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or(UnknownAlgorithm)
    }
}

/// Error building a [`SecretKey`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The byte count does not match the algorithm.
    #[error("{algorithm} key must be {expected} bytes, got {got}")]
    WrongLength {
        /// Algorithm the key was meant for.
        algorithm: KeyAlgorithm,
        /// Required length.
        expected: usize,
        /// Supplied length.
        got: usize,
    },
}

/// A symmetric key (master key, per-card admin key, SO unblock key) with its algorithm.
///
/// The bytes sit in a zeroizing buffer and `Debug` shows only the algorithm and the key check
/// value, so a key that ends up in a log line or a panic message discloses nothing usable.
#[derive(Clone)]
pub struct SecretKey {
    algorithm: KeyAlgorithm,
    bytes: Zeroizing<Vec<u8>>,
}

/// Per-card admin key: the same type, named for readability at call sites.
pub type AdminKey = SecretKey;

impl SecretKey {
    /// Copies `bytes` into a new key after checking the length against `algorithm`.
    pub fn new(algorithm: KeyAlgorithm, bytes: &[u8]) -> Result<Self, KeyError> {
        Self::from_zeroizing(algorithm, Zeroizing::new(bytes.to_vec()))
    }

    /// Takes ownership of an already zeroizing buffer (no extra copy of the secret).
    pub fn from_zeroizing(
        algorithm: KeyAlgorithm,
        bytes: Zeroizing<Vec<u8>>,
    ) -> Result<Self, KeyError> {
        if bytes.len() != algorithm.key_len() {
            return Err(KeyError::WrongLength {
                algorithm,
                expected: algorithm.key_len(),
                got: bytes.len(),
            });
        }
        Ok(SecretKey { algorithm, bytes })
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The raw key bytes. Named so that every use is visible in review: callers must not log,
    /// store unwrapped, or copy these outside zeroizing memory.
    pub fn expose_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Encrypts one block (8 bytes for 3DES, 16 for AES) in ECB mode.
    pub fn encrypt_block(&self, block: &[u8]) -> Result<Zeroizing<Vec<u8>>, PrimitiveError> {
        let out = if self.algorithm.is_tdes() {
            Zeroizing::new(tdes_ecb_encrypt(&self.bytes, block)?.to_vec())
        } else {
            Zeroizing::new(aes_ecb_encrypt(&self.bytes, block)?.to_vec())
        };
        Ok(out)
    }

    /// Key check value: first 3 bytes of E_K(zero block) (8 zero bytes for 3DES, 16 for AES), as
    /// in shared/vectors/README.md and in HSM key ceremonies.
    pub fn kcv(&self) -> [u8; KCV_LEN] {
        self.kcv_of_block(0x00)
    }

    /// Key check value the GlobalPlatform way: same as [`SecretKey::kcv`] for 3DES, but for AES
    /// the first 3 bytes of E_K(01 x 16) (GP Card Spec Amendment D, SCP03). GlobalPlatformPro
    /// prints these, so they are what a card issuer's key sheet usually shows.
    pub fn kcv_gp(&self) -> [u8; KCV_LEN] {
        if self.algorithm.is_tdes() {
            self.kcv()
        } else {
            self.kcv_of_block(0x01)
        }
    }

    fn kcv_of_block(&self, fill: u8) -> [u8; KCV_LEN] {
        let block = vec![fill; self.algorithm.block_len()];
        let mut kcv = [0u8; KCV_LEN];
        // The length invariant of SecretKey makes this infallible; fall back to zeros rather
        // than panic if it were ever broken.
        if let Ok(out) = self.encrypt_block(&block) {
            kcv.copy_from_slice(&out[..KCV_LEN]);
        }
        kcv
    }

    /// Checks a key check value typed or received during key import, in constant time.
    pub fn verify_kcv(&self, expected: &[u8]) -> bool {
        let kcv = self.kcv();
        expected.len() == KCV_LEN && bool::from(kcv.ct_eq(expected))
    }

    /// Constant-time comparison of two keys (algorithm and bytes).
    pub fn ct_eq(&self, other: &SecretKey) -> bool {
        self.algorithm == other.algorithm && bool::from(self.bytes.ct_eq(&other.bytes))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("algorithm", &self.algorithm)
            .field("kcv", &hex_upper(&self.kcv()))
            .finish_non_exhaustive()
    }
}

/// Upper-case hex without separators.
pub(crate) fn hex_upper(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0F)]));
    }
    s
}

/// Constant-time equality of two byte strings (lengths are not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}
