//! Block-cipher primitives and the key type that carries secret bytes.
//!
//! Everything above this module (diversification, cryptograms, the SO token, PIV PUKs) is built
//! from a few operations: one ECB block of 3DES, one ECB block of AES, CMAC (AES, and 3DES for
//! PUKs under a 3DES master key), and the key check value. They live here, behind length-checked
//! functions, so that no other module touches the RustCrypto traits and every intermediate that
//! could hold key material ends up in a zeroizing buffer. [`cmac_by_blocks`] computes the same
//! CMAC through an encrypt-only oracle, for HSM keys that may encrypt but not sign.

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
    let tag = cmac_tag::<C>(key, message, "AES-CMAC", AES_KEY_LENGTHS)?;
    let mut out = Zeroizing::new([0u8; AES_BLOCK_LEN]);
    if tag.len() != AES_BLOCK_LEN {
        return Err(PrimitiveError::BlockLength {
            algorithm: "AES-CMAC",
            expected: AES_BLOCK_LEN,
            got: tag.len(),
        });
    }
    out.copy_from_slice(&tag);
    Ok(out)
}

/// CMAC with block cipher `C` (its block length is the tag length), in a zeroizing buffer.
fn cmac_tag<C>(
    key: &[u8],
    message: &[u8],
    algorithm: &'static str,
    key_lengths: &'static [usize],
) -> Result<Zeroizing<Vec<u8>>, PrimitiveError>
where
    Cmac<C>: KeyInit + Mac,
    C: cmac::block_api::CmacCipher,
{
    let mut mac =
        <Cmac<C> as KeyInit>::new_from_slice(key).map_err(|_| PrimitiveError::KeyLength {
            algorithm,
            expected: key_lengths,
            got: key.len(),
        })?;
    Mac::update(&mut mac, message);
    let mut tag = mac.finalize().into_bytes();
    let out = Zeroizing::new(tag[..].to_vec());
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

/// CMAC (NIST SP 800-38B) built from single-block ECB encryptions under a key of `algorithm`:
/// for a key that can only be used through an `encrypt` oracle, such as an HSM object allowed
/// to encrypt but not to sign (a 3DES master key on a PKCS#11 token). `encrypt` must replace
/// its argument, one block of `algorithm.block_len()` bytes, with E_K(block).
///
/// The result equals [`SecretKey::cmac`] for the same key: TDES-CMAC (64-bit blocks, R = 0x1B)
/// for 3DES, AES-CMAC (R = 0x87) for AES. The subkey L = E_K(0) and every chaining value pass
/// through this function in zeroizing buffers; the key itself never does.
pub fn cmac_by_blocks<E>(
    algorithm: KeyAlgorithm,
    message: &[u8],
    mut encrypt: impl FnMut(&mut [u8]) -> Result<(), E>,
) -> Result<Zeroizing<Vec<u8>>, E> {
    let n = algorithm.block_len();
    let rb = if n == TDES_BLOCK_LEN { 0x1B } else { 0x87 };
    let mut l = Zeroizing::new(vec![0u8; n]);
    encrypt(&mut l)?;
    let k1 = dbl(&l, rb);
    let k2 = dbl(&k1, rb);
    let blocks = message.len().div_ceil(n).max(1);
    let complete = !message.is_empty() && message.len().is_multiple_of(n);
    let mut state = Zeroizing::new(vec![0u8; n]);
    for chunk in message.chunks(n).take(blocks - 1) {
        for (s, m) in state.iter_mut().zip(chunk) {
            *s ^= m;
        }
        encrypt(&mut state)?;
    }
    let last = &message[(blocks - 1) * n..];
    let mut padded = Zeroizing::new(vec![0u8; n]);
    padded[..last.len()].copy_from_slice(last);
    let subkey = if complete {
        &k1
    } else {
        padded[last.len()] = 0x80;
        &k2
    };
    for ((s, m), k) in state.iter_mut().zip(padded.iter()).zip(subkey.iter()) {
        *s ^= m ^ k;
    }
    encrypt(&mut state)?;
    Ok(state)
}

/// Doubling in GF(2^n) (SP 800-38B subkey generation), without a branch on the secret bit.
fn dbl(block: &[u8], rb: u8) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(vec![0u8; block.len()]);
    for i in 0..block.len() {
        let carry = block.get(i + 1).map_or(0, |next| next >> 7);
        out[i] = (block[i] << 1) | carry;
    }
    let msb = block.first().map_or(0, |b| b >> 7);
    if let Some(last) = out.last_mut() {
        *last ^= rb & 0u8.wrapping_sub(msb);
    }
    out
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

    /// CMAC (NIST SP 800-38B) over `message` with this key's cipher: TDES-CMAC (8-byte tag)
    /// for a 3DES key, AES-CMAC (16-byte tag) for an AES key.
    pub fn cmac(&self, message: &[u8]) -> Result<Zeroizing<Vec<u8>>, PrimitiveError> {
        let key = &self.bytes[..];
        match self.algorithm {
            KeyAlgorithm::Tdes2Key => {
                cmac_tag::<TdesEde2>(key, message, "3DES-CMAC", TDES_KEY_LENGTHS)
            }
            KeyAlgorithm::Tdes3Key => {
                cmac_tag::<TdesEde3>(key, message, "3DES-CMAC", TDES_KEY_LENGTHS)
            }
            KeyAlgorithm::Aes128 => cmac_tag::<Aes128>(key, message, "AES-CMAC", AES_KEY_LENGTHS),
            KeyAlgorithm::Aes192 => cmac_tag::<Aes192>(key, message, "AES-CMAC", AES_KEY_LENGTHS),
            KeyAlgorithm::Aes256 => cmac_tag::<Aes256>(key, message, "AES-CMAC", AES_KEY_LENGTHS),
        }
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
            .field("kcv", &data_encoding::HEXUPPER.encode(&self.kcv()))
            .finish_non_exhaustive()
    }
}

/// Constant-time equality of two byte strings (lengths are not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        data_encoding::HEXUPPER_PERMISSIVE
            .decode(s.as_bytes())
            .unwrap()
    }

    /// CMAC through an encrypt-only oracle, as an HSM backend computes it.
    fn by_blocks(key: &SecretKey, message: &[u8]) -> Zeroizing<Vec<u8>> {
        cmac_by_blocks(key.algorithm(), message, |block| {
            let out = key.encrypt_block(block)?;
            block.copy_from_slice(&out);
            Ok::<(), PrimitiveError>(())
        })
        .unwrap()
    }

    #[test]
    fn cmac_from_blocks_equals_the_cmac_crate_for_every_algorithm_and_length() {
        let message: Vec<u8> = (0u8..=80).map(|i| i.wrapping_mul(29) ^ 0xA5).collect();
        for algorithm in KeyAlgorithm::ALL {
            let bytes: Vec<u8> = (0..algorithm.key_len())
                .map(|i| u8::try_from(i).unwrap().wrapping_mul(7) ^ 0x3C)
                .collect();
            let key = SecretKey::new(algorithm, &bytes).unwrap();
            // Empty, partial, exactly one block, several blocks, complete and incomplete.
            for len in 0..message.len() {
                let crate_tag = key.cmac(&message[..len]).unwrap();
                assert_eq!(crate_tag.len(), algorithm.block_len());
                assert_eq!(
                    &by_blocks(&key, &message[..len])[..],
                    &crate_tag[..],
                    "{algorithm} length {len}"
                );
            }
        }
    }

    #[test]
    fn cmac_matches_published_vectors() {
        // RFC 4493 example 2 (AES-128).
        let aes = SecretKey::new(
            KeyAlgorithm::Aes128,
            &hex("2B7E151628AED2A6ABF7158809CF4F3C"),
        )
        .unwrap();
        let m = hex("6BC1BEE22E409F96E93D7E117393172A");
        assert_eq!(
            &aes.cmac(&m).unwrap()[..],
            &hex("070A16B46B4D4144F79BDD9DD04A287C")[..]
        );
        assert_eq!(
            &by_blocks(&aes, &m)[..],
            &hex("070A16B46B4D4144F79BDD9DD04A287C")[..]
        );
        // RFC 4493 example 1: the empty message (padded, subkey K2).
        assert_eq!(
            &by_blocks(&aes, &[])[..],
            &hex("BB1D6929E95937287FA37D129B756746")[..]
        );
    }

    #[test]
    fn doubling_carries_and_reduces() {
        assert_eq!(&dbl(&[0x00, 0x80], 0x1B)[..], &[0x01, 0x00]);
        assert_eq!(&dbl(&[0x80, 0x01], 0x1B)[..], &[0x00, 0x02 ^ 0x1B]);
        assert_eq!(&dbl(&[0x40, 0x00], 0x87)[..], &[0x80, 0x00]);
    }
}
