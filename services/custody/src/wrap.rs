//! The key-encryption key (KEK) and what it does: wrap keys at rest with AES-256-GCM bound to
//! their key id, purpose and version (a blob moved to another row, or cut, or flipped, fails
//! to open), and keyed fingerprints for values custody must recognise without storing them
//! (a card's challenges for replay refusal).

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

pub const KEK_LEN: usize = 32;
pub const FINGERPRINT_LEN: usize = 32;

/// A keyed fingerprint (HMAC-SHA256 under a KEK subkey): recognises a value without keeping it.
pub type Fingerprint = [u8; FINGERPRINT_LEN];
const BLOB_FORMAT: u8 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WrapError {
    #[error("the system random generator failed")]
    Random,
    #[error("a key-encryption key must be {KEK_LEN} bytes")]
    KekLength,
    #[error("wrapped key is malformed or was altered, moved or truncated")]
    Tampered,
}

/// What a wrapped blob is bound to: opening it under any other binding fails.
#[derive(Clone, Copy, Debug)]
pub struct Binding<'a> {
    pub key_id: &'a str,
    pub purpose: &'a str,
    pub version: u32,
}

impl Binding<'_> {
    fn aad(&self) -> Vec<u8> {
        let mut aad = b"cms-custody/wrap/v1".to_vec();
        for part in [self.key_id.as_bytes(), self.purpose.as_bytes()] {
            aad.extend_from_slice(&(part.len() as u64).to_be_bytes());
            aad.extend_from_slice(part);
        }
        aad.extend_from_slice(&self.version.to_be_bytes());
        aad
    }
}

/// Fills `buf` from the operating system's CSPRNG.
pub fn random(buf: &mut [u8]) -> Result<(), WrapError> {
    SystemRandom::new().fill(buf).map_err(|_| WrapError::Random)
}

pub struct Kek {
    bytes: Zeroizing<[u8; KEK_LEN]>,
    /// HMAC subkeys by label, each derived on first use: every cryptogram takes two
    /// fingerprints, and deriving the subkey on each call was two thirds of their hashing.
    subkeys: RwLock<HashMap<String, Zeroizing<[u8; SUBKEY_LEN]>>>,
}

const SUBKEY_LEN: usize = 32;

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

impl Kek {
    pub fn generate() -> Result<Self, WrapError> {
        let mut bytes = Zeroizing::new([0u8; KEK_LEN]);
        random(&mut bytes[..])?;
        Ok(Self::new(bytes))
    }

    fn new(bytes: Zeroizing<[u8; KEK_LEN]>) -> Self {
        Self {
            bytes,
            subkeys: RwLock::new(HashMap::new()),
        }
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WrapError> {
        let array: [u8; KEK_LEN] = bytes.try_into().map_err(|_| WrapError::KekLength)?;
        Ok(Self::new(Zeroizing::new(array)))
    }

    pub fn expose(&self) -> &[u8] {
        &self.bytes[..]
    }

    /// HMAC-SHA256(KEK, label), as a key: one per purpose, so fingerprints of one kind never
    /// match another's.
    fn subkey(&self, label: &str) -> hmac::Key {
        let cached = self.subkeys.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(subkey) = cached.get(label) {
            return hmac::Key::new(hmac::HMAC_SHA256, &subkey[..]);
        }
        drop(cached);
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.bytes[..]);
        let mut subkey = Zeroizing::new([0u8; SUBKEY_LEN]);
        subkey.copy_from_slice(hmac::sign(&key, label.as_bytes()).as_ref());
        let derived = hmac::Key::new(hmac::HMAC_SHA256, &subkey[..]);
        self.subkeys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(label.to_owned(), subkey);
        derived
    }

    /// Public check value: proves a rebuilt KEK is the right one without revealing it.
    pub fn check_value(&self) -> Vec<u8> {
        hmac::sign(&self.subkey("kek-check"), b"cms-custody kek check v1")
            .as_ref()
            .to_vec()
    }

    /// A keyed fingerprint of `parts` (length-prefixed, so part boundaries matter).
    pub fn fingerprint(&self, label: &str, parts: &[&[u8]]) -> Fingerprint {
        let mut ctx = hmac::Context::with_key(&self.subkey(label));
        for part in parts {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let mut fingerprint = [0u8; FINGERPRINT_LEN];
        fingerprint.copy_from_slice(ctx.sign().as_ref());
        fingerprint
    }

    fn aead(&self) -> LessSafeKey {
        // AES-256 takes any 32-byte key; the length is fixed by the type.
        let unbound = UnboundKey::new(&AES_256_GCM, &self.bytes[..])
            .unwrap_or_else(|_| unreachable!("32-byte AES-256-GCM key"));
        LessSafeKey::new(unbound)
    }

    pub fn wrap(&self, binding: Binding<'_>, plaintext: &[u8]) -> Result<Vec<u8>, WrapError> {
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce)?;
        let mut sealed = plaintext.to_vec();
        self.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(binding.aad()),
                &mut sealed,
            )
            .map_err(|_| WrapError::Tampered)?;
        let mut blob = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        blob.push(BLOB_FORMAT);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        sealed.iter_mut().for_each(|b| *b = 0);
        Ok(blob)
    }

    pub fn unwrap(
        &self,
        binding: Binding<'_>,
        blob: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, WrapError> {
        if blob.len() < 1 + NONCE_LEN + AES_256_GCM.tag_len() || blob[0] != BLOB_FORMAT {
            return Err(WrapError::Tampered);
        }
        let nonce: [u8; NONCE_LEN] = blob[1..1 + NONCE_LEN]
            .try_into()
            .map_err(|_| WrapError::Tampered)?;
        let mut buf = Zeroizing::new(blob[1 + NONCE_LEN..].to_vec());
        let len = self
            .aead()
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(binding.aad()),
                &mut buf,
            )
            .map_err(|_| WrapError::Tampered)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn binding(key_id: &str, version: u32) -> Binding<'_> {
        Binding {
            key_id,
            purpose: "master-key",
            version,
        }
    }

    #[test]
    fn round_trip() {
        let kek = Kek::generate().unwrap();
        let blob = kek.wrap(binding("mk", 1), KEY).unwrap();
        assert_eq!(&kek.unwrap(binding("mk", 1), &blob).unwrap()[..], KEY);
    }

    #[test]
    fn every_flipped_byte_is_rejected() {
        let kek = Kek::generate().unwrap();
        let blob = kek.wrap(binding("mk", 1), KEY).unwrap();
        for i in 0..blob.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = blob.clone();
                bad[i] ^= bit;
                assert_eq!(
                    kek.unwrap(binding("mk", 1), &bad).unwrap_err(),
                    WrapError::Tampered,
                    "byte {i}"
                );
            }
        }
    }

    #[test]
    fn moved_or_truncated_blobs_are_rejected() {
        let kek = Kek::generate().unwrap();
        let blob = kek.wrap(binding("mk", 1), KEY).unwrap();
        // Another key id, version or purpose: the blob was moved to another row.
        assert!(kek.unwrap(binding("other", 1), &blob).is_err());
        assert!(kek.unwrap(binding("mk", 2), &blob).is_err());
        let purpose = Binding {
            key_id: "mk",
            purpose: "so-token",
            version: 1,
        };
        assert!(kek.unwrap(purpose, &blob).is_err());
        for len in 0..blob.len() {
            assert!(
                kek.unwrap(binding("mk", 1), &blob[..len]).is_err(),
                "len {len}"
            );
        }
        // Another KEK.
        assert!(
            Kek::generate()
                .unwrap()
                .unwrap(binding("mk", 1), &blob)
                .is_err()
        );
    }

    #[test]
    fn check_value_and_fingerprints_depend_on_the_kek() {
        let a = Kek::from_bytes(KEY).unwrap();
        let b = Kek::generate().unwrap();
        assert_eq!(a.check_value(), Kek::from_bytes(KEY).unwrap().check_value());
        assert_ne!(a.check_value(), b.check_value());
        assert_ne!(
            a.fingerprint("x", &[b"ab", b"c"]),
            a.fingerprint("x", &[b"a", b"bc"])
        );
        assert_ne!(a.fingerprint("x", &[b"a"]), b.fingerprint("x", &[b"a"]));
    }

    #[test]
    fn cached_subkeys_give_the_fingerprints_a_fresh_kek_gives() {
        let a = Kek::from_bytes(KEY).unwrap();
        let first = a.fingerprint("card", &[b"ref", b"card"]);
        assert_eq!(a.fingerprint("card", &[b"ref", b"card"]), first);
        let fresh = Kek::from_bytes(KEY).unwrap();
        assert_eq!(fresh.fingerprint("card", &[b"ref", b"card"]), first);
        assert_ne!(a.fingerprint("card-challenge", &[b"ref", b"card"]), first);
    }
}
