//! Per-card admin-key diversification: admin key = diversify(master key, card identifier).
//!
//! Custody keeps one master key per template and key version; every card gets its own admin key
//! derived from its identifier, so one card's key (read out of a broken card) does not open
//! another. The schemes are a closed set chosen by the card template and follow
//! shared/vectors/README.md byte for byte, so that the soft backend and an HSM produce identical
//! keys.
//!
//! With KDD = the rightmost 10 bytes of the card id, left-padded with 00:
//!
//! | scheme | master key | derivation | HSM can derive inside with ECB_ENCRYPT_DATA? |
//! |---|---|---|---|
//! | `gp-emv` | 2-key 3DES | 3DES-ECB(MK, KDD[4..10] F001 KDD[4..10] 0F01) | yes: CKM_DES3_ECB_ENCRYPT_DATA over [`gp_derivation_data`] |
//! | `gp-visa2` | 2-key 3DES | 3DES-ECB(MK, KDD[0..2] KDD[4..8] F001 KDD[0..2] KDD[4..8] 0F01) | yes, same way |
//! | `gp-kdf3` | AES | AES-CMAC(MK, i 000000 01 00 KDD), i = 1, 2, … | no: needs CMAC ([`gp_kdf3_input`] gives the message) |
//! | `sp800-108-cmac` | AES | SP 800-108 counter mode, PRF AES-CMAC | no with ECB_ENCRYPT_DATA; yes with PKCS#11 3.0 CKM_SP800_108_COUNTER_KDF + CMAC PRF over [`sp800_108_fixed_input`] |
//!
//! ECB_ENCRYPT_DATA only encrypts the data with the base key; CMAC needs the subkeys and a chain,
//! which an HSM will not do inside a derive unless it offers a KDF mechanism.

use std::fmt;
use std::str::FromStr;

use zeroize::{Zeroize, Zeroizing};

use crate::primitives::{
    KeyAlgorithm, PrimitiveError, SecretKey, aes_cmac, lengths, tdes_ecb_encrypt,
};

/// Length of the key diversification data (KDD) taken from the card id.
pub const KDD_LEN: usize = 10;

/// Longest card identifier accepted (minidriver cardid and PIV GUID are 16 bytes; serials are
/// shorter). The limit keeps garbage out of the derivation input.
pub const MAX_CARD_ID_LEN: usize = 64;

/// Label of the `sp800-108-cmac` scheme.
pub const SP800_108_LABEL: &[u8] = b"CMS-ADMIN-KEY";

/// Diversification schemes (closed set; the names are configuration values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// GlobalPlatform EMV CPS style, 3DES.
    GpEmv,
    /// GlobalPlatform VISA2 style, 3DES.
    GpVisa2,
    /// GlobalPlatform SCP03 KDF style, AES-CMAC.
    GpKdf3,
    /// NIST SP 800-108 counter mode with AES-CMAC: the default for new AES cards.
    Sp800108Cmac,
}

impl Scheme {
    /// Every scheme.
    pub const ALL: [Scheme; 4] = [
        Scheme::GpEmv,
        Scheme::GpVisa2,
        Scheme::GpKdf3,
        Scheme::Sp800108Cmac,
    ];

    /// Configuration name: `gp-emv`, `gp-visa2`, `gp-kdf3`, `sp800-108-cmac`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Scheme::GpEmv => "gp-emv",
            Scheme::GpVisa2 => "gp-visa2",
            Scheme::GpKdf3 => "gp-kdf3",
            Scheme::Sp800108Cmac => "sp800-108-cmac",
        }
    }

    /// Master-key algorithms the scheme accepts.
    pub const fn master_algorithms(self) -> &'static [KeyAlgorithm] {
        match self {
            Scheme::GpEmv | Scheme::GpVisa2 => &[KeyAlgorithm::Tdes2Key],
            Scheme::GpKdf3 | Scheme::Sp800108Cmac => &[
                KeyAlgorithm::Aes128,
                KeyAlgorithm::Aes192,
                KeyAlgorithm::Aes256,
            ],
        }
    }

    /// Admin-key algorithms the scheme can produce: 3DES for the GP 3DES schemes, AES for the
    /// CMAC schemes (gp-kdf3 further needs the master key's length).
    pub const fn admin_algorithms(self) -> &'static [KeyAlgorithm] {
        match self {
            Scheme::GpEmv | Scheme::GpVisa2 => &[KeyAlgorithm::Tdes2Key, KeyAlgorithm::Tdes3Key],
            Scheme::GpKdf3 | Scheme::Sp800108Cmac => &[
                KeyAlgorithm::Aes128,
                KeyAlgorithm::Aes192,
                KeyAlgorithm::Aes256,
            ],
        }
    }

    /// True when an HSM can derive the admin key inside itself with one
    /// CKM_DES3_ECB_ENCRYPT_DATA over [`gp_derivation_data`] (the GP 3DES schemes). The CMAC
    /// schemes cannot use CKM_AES_ECB_ENCRYPT_DATA.
    pub const fn hsm_ecb_derivable(self) -> bool {
        matches!(self, Scheme::GpEmv | Scheme::GpVisa2)
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scheme {
    type Err = DiversifyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scheme::ALL
            .into_iter()
            .find(|scheme| scheme.as_str() == s)
            .ok_or(DiversifyError::UnknownScheme)
    }
}

/// Why a derivation was refused. Names the mismatch, never key or card-id bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiversifyError {
    /// The scheme name is not one of the four.
    #[error("unknown diversification scheme; expected gp-emv, gp-visa2, gp-kdf3 or sp800-108-cmac")]
    UnknownScheme,
    /// The master key's algorithm does not fit the scheme.
    #[error("scheme {scheme} needs a {} master key, got {got}", algorithms(scheme.master_algorithms()))]
    MasterKeyAlgorithm {
        /// Requested scheme.
        scheme: Scheme,
        /// Algorithm of the supplied master key.
        got: KeyAlgorithm,
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
    /// The requested admin-key length is not possible for this scheme and master key.
    #[error(
        "scheme {scheme} cannot produce a {got}-byte admin key here; expected {} bytes",
        lengths(expected)
    )]
    OutputLength {
        /// Requested scheme.
        scheme: Scheme,
        /// Requested length.
        got: usize,
        /// Lengths the scheme can produce with this master key.
        expected: Vec<usize>,
    },
    /// A scheme-specific helper was called for another scheme.
    #[error("scheme {scheme} has no {what}")]
    NotApplicable {
        /// Scheme passed in.
        scheme: Scheme,
        /// What was asked for.
        what: &'static str,
    },
    /// A primitive refused its input (an internal invariant was broken).
    #[error(transparent)]
    Primitive(#[from] PrimitiveError),
}

fn algorithms(list: &[KeyAlgorithm]) -> String {
    let names: Vec<&str> = list.iter().map(|a| a.as_str()).collect();
    names.join(" or ")
}

fn check_card_id(card_id: &[u8]) -> Result<(), DiversifyError> {
    if card_id.is_empty() {
        return Err(DiversifyError::EmptyCardId);
    }
    if card_id.len() > MAX_CARD_ID_LEN {
        return Err(DiversifyError::CardIdTooLong {
            got: card_id.len(),
            max: MAX_CARD_ID_LEN,
        });
    }
    Ok(())
}

/// KDD: the rightmost 10 bytes of the card id, left-padded with 00 when it is shorter.
pub fn kdd(card_id: &[u8]) -> Result<[u8; KDD_LEN], DiversifyError> {
    check_card_id(card_id)?;
    let mut out = [0u8; KDD_LEN];
    let take = card_id.len().min(KDD_LEN);
    out[KDD_LEN - take..].copy_from_slice(&card_id[card_id.len() - take..]);
    Ok(out)
}

/// The 16-byte data block D of the GP 3DES schemes; K16 = 3DES-ECB(MK, D).
///
/// An HSM backend passes D to CKM_DES3_ECB_ENCRYPT_DATA with the master key as base key: the
/// derived 16-byte DES2 key is K16, the same key as the 24-byte admin key K16 || K16[0..8].
pub fn gp_derivation_data(scheme: Scheme, card_id: &[u8]) -> Result<[u8; 16], DiversifyError> {
    let k = kdd(card_id)?;
    let half: [u8; 6] = match scheme {
        Scheme::GpEmv => [k[4], k[5], k[6], k[7], k[8], k[9]],
        Scheme::GpVisa2 => [k[0], k[1], k[4], k[5], k[6], k[7]],
        Scheme::GpKdf3 | Scheme::Sp800108Cmac => {
            return Err(DiversifyError::NotApplicable {
                scheme,
                what: "3DES derivation data block",
            });
        }
    };
    let mut d = [0u8; 16];
    d[0..6].copy_from_slice(&half);
    d[6..8].copy_from_slice(&[0xF0, 0x01]);
    d[8..14].copy_from_slice(&half);
    d[14..16].copy_from_slice(&[0x0F, 0x01]);
    Ok(d)
}

/// The CMAC message of `gp-kdf3` for block `counter` (1, 2, …): `i 00 00 00 01 00 KDD`.
pub fn gp_kdf3_input(card_id: &[u8], counter: u8) -> Result<[u8; 16], DiversifyError> {
    let k = kdd(card_id)?;
    let mut m = [0u8; 16];
    m[0] = counter;
    m[4] = 0x01;
    m[6..].copy_from_slice(&k);
    Ok(m)
}

/// The SP 800-108 fixed input of `sp800-108-cmac` (everything after the 32-bit counter):
/// `"CMS-ADMIN-KEY" || 00 || CID || V (u32 BE) || L*8 (u32 BE)`. The context is the whole card
/// id, not the KDD. An HSM with CKM_SP800_108_COUNTER_KDF (PRF AES-CMAC, 32-bit big-endian
/// counter placed first) can derive with it.
pub fn sp800_108_fixed_input(
    card_id: &[u8],
    key_version: u32,
    out_len: usize,
) -> Result<Vec<u8>, DiversifyError> {
    check_card_id(card_id)?;
    let bits = u32::try_from(out_len * 8).map_err(|_| DiversifyError::OutputLength {
        scheme: Scheme::Sp800108Cmac,
        got: out_len,
        expected: AES_OUT_LENGTHS.to_vec(),
    })?;
    let mut fixed = Vec::with_capacity(SP800_108_LABEL.len() + 1 + card_id.len() + 8);
    fixed.extend_from_slice(SP800_108_LABEL);
    fixed.push(0x00);
    fixed.extend_from_slice(card_id);
    fixed.extend_from_slice(&key_version.to_be_bytes());
    fixed.extend_from_slice(&bits.to_be_bytes());
    Ok(fixed)
}

const AES_OUT_LENGTHS: &[usize] = &[16, 24, 32];
const GP_TDES_OUT_LENGTHS: &[usize] = &[16, 24];

/// Derives the per-card admin key.
///
/// * `gp-emv`, `gp-visa2`: 16-byte 3DES master key (K1 K2 K1). `out_len` 24 gives the 3-key
///   admin key K16 || K16[0..8] of the README; 16 gives K16 as a 2-key 3DES key (the same key).
///   `key_version` only selects the master key; it is not part of the derivation.
/// * `gp-kdf3`: AES master key; `out_len` must equal the master-key length.
///   `key_version` is not part of the derivation.
/// * `sp800-108-cmac`: AES master key of any size; `out_len` 16, 24 or 32 (it is bound into the
///   input, so different lengths give unrelated keys); `key_version` is bound into the context.
pub fn diversify(
    scheme: Scheme,
    master: &SecretKey,
    card_id: &[u8],
    key_version: u32,
    out_len: usize,
) -> Result<SecretKey, DiversifyError> {
    if !scheme.master_algorithms().contains(&master.algorithm()) {
        return Err(DiversifyError::MasterKeyAlgorithm {
            scheme,
            got: master.algorithm(),
        });
    }
    check_card_id(card_id)?;
    let out_error = |expected: &[usize]| DiversifyError::OutputLength {
        scheme,
        got: out_len,
        expected: expected.to_vec(),
    };
    let mk = master.expose_bytes();
    let (algorithm, bytes) = match scheme {
        Scheme::GpEmv | Scheme::GpVisa2 => {
            let algorithm = match out_len {
                16 => KeyAlgorithm::Tdes2Key,
                24 => KeyAlgorithm::Tdes3Key,
                _ => return Err(out_error(GP_TDES_OUT_LENGTHS)),
            };
            let d = gp_derivation_data(scheme, card_id)?;
            let mut k = Zeroizing::new(Vec::with_capacity(24));
            k.extend_from_slice(&tdes_ecb_encrypt(mk, &d[..8])?[..]);
            k.extend_from_slice(&tdes_ecb_encrypt(mk, &d[8..])?[..]);
            if out_len == 24 {
                let k1 = Zeroizing::new(k[..8].to_vec());
                k.extend_from_slice(&k1);
            }
            (algorithm, k)
        }
        Scheme::GpKdf3 => {
            if out_len != mk.len() {
                return Err(out_error(&[mk.len()]));
            }
            let algorithm =
                KeyAlgorithm::aes_for_len(out_len).ok_or_else(|| out_error(&[mk.len()]))?;
            let mut k = Zeroizing::new(Vec::with_capacity(out_len + 16));
            let mut counter: u8 = 1;
            while k.len() < out_len {
                let block = aes_cmac(mk, &gp_kdf3_input(card_id, counter)?)?;
                k.extend_from_slice(&block[..]);
                counter = counter.wrapping_add(1);
            }
            truncate_zeroizing(&mut k, out_len);
            (algorithm, k)
        }
        Scheme::Sp800108Cmac => {
            let algorithm =
                KeyAlgorithm::aes_for_len(out_len).ok_or_else(|| out_error(AES_OUT_LENGTHS))?;
            let fixed = sp800_108_fixed_input(card_id, key_version, out_len)?;
            let mut message = Zeroizing::new(Vec::with_capacity(4 + fixed.len()));
            let mut k = Zeroizing::new(Vec::with_capacity(out_len + 16));
            let mut counter: u32 = 1;
            while k.len() < out_len {
                message.clear();
                message.extend_from_slice(&counter.to_be_bytes());
                message.extend_from_slice(&fixed);
                let block = aes_cmac(mk, &message)?;
                k.extend_from_slice(&block[..]);
                counter += 1;
            }
            truncate_zeroizing(&mut k, out_len);
            (algorithm, k)
        }
    };
    SecretKey::from_zeroizing(algorithm, bytes).map_err(|_| out_error(&[out_len]))
}

/// Truncates a key stream, wiping the dropped tail first (truncate alone leaves it in memory).
fn truncate_zeroizing(k: &mut Zeroizing<Vec<u8>>, len: usize) {
    if k.len() > len {
        k[len..].zeroize();
        k.truncate(len);
    }
}
