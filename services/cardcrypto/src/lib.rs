//! Card cryptography for the CMS, without I/O.
//!
//! Custody (server side) and the card agent (desktop side) must compute exactly the same bytes:
//! custody derives per-card admin keys and answers challenges, the agent checks typed codes and,
//! for the System Owner token, computes the cryptogram itself while the CMS is down. Keeping that
//! math in one small crate, tested against shared/vectors, is what makes the two agree.
//!
//! Module map:
//!
//! * [`code`]: codes people type — hex in groups of 4 with a CRC-16/IBM-3740 checksum; parsing
//!   with errors that never echo the code.
//! * [`primitives`]: one ECB block of 3DES/AES, CMAC, key check values, and [`SecretKey`],
//!   the zeroizing key type whose `Debug` shows only algorithm and KCV.
//! * [`diversify`](mod@diversify): per-card admin key = diversify(master key, card id) for the
//!   schemes `gp-emv`, `gp-visa2`, `gp-kdf3`, `sp800-108-cmac`, plus the derivation inputs an
//!   HSM needs.
//! * [`cryptogram`](mod@cryptogram): response = E_K(challenge), one ECB block, and its
//!   constant-time check.
//! * [`so_token`]: the System Owner token's unblock key: generated from caller randomness, shown
//!   once with a checksum, typed back, used locally.
//! * [`weak`]: degenerate keys (all zeros, weak or repeated DES keys) that a key ceremony
//!   refuses.
//! * [`puk`]: a PIV card's PUK, derived per card and PUK version from a master key (SP 800-108
//!   with a CMAC PRF, decimalised without modulo bias), in software or with an HSM's PRF.
//!
//! Secrets (keys, responses, parsed codes) are returned in [`zeroize::Zeroizing`] containers;
//! comparisons of secrets are constant time ([`subtle`]).
//!
//! The offline helpdesk flow, end to end:
//!
//! ```
//! use cms_cardcrypto::{KeyAlgorithm, Scheme, SecretKey, checksum, diversify, format_groups};
//! use cms_cardcrypto::{parse_with_checksum, response};
//! use cms_cardcrypto::cryptogram::CHALLENGE_LENGTHS;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Custody: the template's master key and the card's identifier give the admin key.
//! let master = SecretKey::new(KeyAlgorithm::Tdes2Key, &[0x42; 16])?;
//! let admin = diversify(Scheme::GpEmv, &master, b"card-0001", 1, 24)?;
//!
//! // The operator types what the user reads from the unblock screen.
//! let challenge = parse_with_checksum("1603 ebdf-1c8a 2e72", "9d70", CHALLENGE_LENGTHS)?;
//! let answer = response(&admin, &challenge)?;
//!
//! // ... and reads back the response with its checksum.
//! let (shown, sum) = (format_groups(&answer), checksum(&answer));
//! assert_eq!(&parse_with_checksum(&shown, &sum, &[8])?[..], &answer[..]);
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod code;
pub mod cryptogram;
pub mod diversify;
pub mod primitives;
pub mod puk;
pub mod so_token;
pub mod weak;

pub use code::{
    CharacterClass, CodeError, TypedCode, checksum, format_groups, parse_hex, parse_with_checksum,
};
pub use cryptogram::{CryptogramError, response, verify_response};
pub use diversify::{DiversifyError, Scheme, diversify, gp_derivation_data, sp800_108_fixed_input};
pub use primitives::{
    AdminKey, KeyAlgorithm, KeyError, PrimitiveError, SecretKey, aes_cmac, aes_ecb_encrypt,
    cmac_by_blocks, tdes_ecb_encrypt,
};
pub use puk::{Puk, PukError, PukInput, derive_puk, derive_puk_with};
pub use so_token::{SoTokenError, SoUnblockKey, so_cryptogram};
pub use weak::{Degenerate, degenerate};
pub use zeroize::Zeroizing;
