//! The cryptogram that unblocks a card: response = E_K(challenge), ECB, one block.
//!
//! This is the minidriver admin-key challenge/response (EXTERNAL AUTHENTICATE) and also the
//! answer to a PIV 9B management-key challenge. A 3DES admin key answers an 8-byte challenge, an
//! AES admin key a 16-byte challenge; anything else is refused before any encryption, because a
//! response computed for the wrong kind of card would only burn one of its tries.

use zeroize::Zeroizing;

use crate::primitives::{KeyAlgorithm, SecretKey, ct_eq};

/// Challenge lengths a card can present: 8 bytes (3DES admin key), 16 bytes (AES admin key).
/// Pass to [`crate::code::parse_with_checksum`] when reading a typed challenge.
pub const CHALLENGE_LENGTHS: &[usize] = &[8, 16];

/// Why no response was computed. Names lengths and algorithms, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptogramError {
    /// The challenge length does not match the admin key's block size.
    #[error("{algorithm} admin key answers {expected}-byte challenges, got {got} bytes")]
    ChallengeLength {
        /// Algorithm of the admin key.
        algorithm: KeyAlgorithm,
        /// Block length of that algorithm.
        expected: usize,
        /// Length of the challenge supplied.
        got: usize,
    },
}

fn check_challenge(admin_key: &SecretKey, challenge: &[u8]) -> Result<(), CryptogramError> {
    let algorithm = admin_key.algorithm();
    if challenge.len() != algorithm.block_len() {
        return Err(CryptogramError::ChallengeLength {
            algorithm,
            expected: algorithm.block_len(),
            got: challenge.len(),
        });
    }
    Ok(())
}

/// Computes the response to a card challenge: one ECB block of 3DES (2- or 3-key, 8-byte
/// challenge) or AES (16-byte challenge) under the admin key.
pub fn response(
    admin_key: &SecretKey,
    challenge: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptogramError> {
    check_challenge(admin_key, challenge)?;
    admin_key
        .encrypt_block(challenge)
        // Unreachable after check_challenge; map defensively instead of panicking.
        .map_err(|_| CryptogramError::ChallengeLength {
            algorithm: admin_key.algorithm(),
            expected: admin_key.algorithm().block_len(),
            got: challenge.len(),
        })
}

/// Checks a response in constant time (a virtual card or a test harness plays the card side).
/// Any length mismatch is simply `false`.
pub fn verify_response(admin_key: &SecretKey, challenge: &[u8], response_bytes: &[u8]) -> bool {
    match response(admin_key, challenge) {
        Ok(expected) => ct_eq(&expected, response_bytes),
        Err(_) => false,
    }
}
