//! The `soft` backend: master keys wrapped under the KEK in custody's own database.

use cms_cardcrypto::{KeyAlgorithm, Puk, PukInput, SecretKey, Zeroizing};
use cms_proto::custody::v1::Backend;

use super::{CryptogramInput, Keystore, KeystoreError, MasterKeyHandle, Stored, binding, pkcs11};
use crate::config::KeystoreBackend;
use crate::wrap::Kek;

/// Draws of a random key before the generator is taken for broken.
const MAX_DRAWS: usize = 4;

/// Master keys wrapped under the KEK in custody's own database.
#[derive(Debug, Default)]
pub struct SoftKeystore;

impl SoftKeystore {
    fn store(
        &self,
        kek: &Kek,
        reference: &str,
        version: u32,
        key: &SecretKey,
    ) -> Result<Stored, KeystoreError> {
        Ok(Stored {
            blob: kek.wrap(binding(reference, version), key.expose_bytes())?,
            kcv: key.kcv(),
        })
    }
}

impl Keystore for SoftKeystore {
    fn backend(&self) -> Backend {
        Backend::Soft
    }

    fn generate(
        &self,
        kek: &Kek,
        reference: &str,
        version: u32,
        algorithm: KeyAlgorithm,
    ) -> Result<Stored, KeystoreError> {
        // A weak or repeated DES part is a 2^-50-ish draw, but a key ceremony refuses such
        // keys, so the generator does too; a generator that keeps drawing them is broken.
        for _ in 0..MAX_DRAWS {
            let mut bytes = Zeroizing::new(vec![0u8; algorithm.key_len()]);
            crate::wrap::random(&mut bytes).map_err(|_| KeystoreError::Random)?;
            let key =
                SecretKey::from_zeroizing(algorithm, bytes).map_err(|_| KeystoreError::Corrupt)?;
            if cms_cardcrypto::degenerate(&key).is_none() {
                return self.store(kek, reference, version, &key);
            }
        }
        Err(KeystoreError::Random)
    }

    fn import(
        &self,
        kek: &Kek,
        reference: &str,
        version: u32,
        key: &SecretKey,
    ) -> Result<Stored, KeystoreError> {
        self.store(kek, reference, version, key)
    }

    fn load(
        &self,
        kek: &Kek,
        reference: &str,
        version: u32,
        algorithm: KeyAlgorithm,
        blob: &[u8],
    ) -> Result<MasterKeyHandle, KeystoreError> {
        let bytes = kek.unwrap(binding(reference, version), blob)?;
        if pkcs11::is_object_reference(&bytes) {
            return Err(KeystoreError::OtherBackend {
                made_by: KeystoreBackend::Pkcs11,
                running: KeystoreBackend::Soft,
            });
        }
        let key = SecretKey::new(algorithm, &bytes).map_err(|_| KeystoreError::Corrupt)?;
        Ok(MasterKeyHandle::Soft(key))
    }

    fn cryptogram(
        &self,
        master: &MasterKeyHandle,
        input: &CryptogramInput<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
        let MasterKeyHandle::Soft(master) = master else {
            return Err(KeystoreError::OtherBackend {
                made_by: KeystoreBackend::Pkcs11,
                running: KeystoreBackend::Soft,
            });
        };
        let admin = cms_cardcrypto::diversify(
            input.scheme,
            master,
            input.card_id,
            input.key_version,
            input.admin_algorithm.key_len(),
        )?;
        Ok(cms_cardcrypto::response(&admin, input.challenge)?)
    }

    fn puk(&self, master: &MasterKeyHandle, input: &PukInput<'_>) -> Result<Puk, KeystoreError> {
        let MasterKeyHandle::Soft(master) = master else {
            return Err(KeystoreError::OtherBackend {
                made_by: KeystoreBackend::Pkcs11,
                running: KeystoreBackend::Soft,
            });
        };
        Ok(cms_cardcrypto::derive_puk(master, input)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pkcs11_reference_is_never_taken_for_key_bytes() {
        let kek = Kek::generate().unwrap();
        let mut payload = b"cms-pkcs11/v1:".to_vec();
        payload.extend_from_slice(&[9u8; 16]);
        let blob = kek.wrap(binding("mk", 1), &payload).unwrap();
        for algorithm in KeyAlgorithm::ALL {
            let err = SoftKeystore
                .load(&kek, "mk", 1, algorithm, &blob)
                .unwrap_err();
            assert!(matches!(err, KeystoreError::OtherBackend { .. }), "{err}");
        }
    }

    #[test]
    fn generated_and_imported_keys_load_back_with_their_kcv() {
        let kek = Kek::generate().unwrap();
        for algorithm in KeyAlgorithm::ALL {
            let stored = SoftKeystore.generate(&kek, "mk", 1, algorithm).unwrap();
            let MasterKeyHandle::Soft(key) = SoftKeystore
                .load(&kek, "mk", 1, algorithm, &stored.blob)
                .unwrap()
            else {
                panic!("soft handle");
            };
            assert_eq!(key.kcv(), stored.kcv);
            let imported = SoftKeystore.import(&kek, "mk", 2, &key).unwrap();
            assert_eq!(imported.kcv, stored.kcv);
            // Bound to its row: another version does not open it.
            assert!(
                SoftKeystore
                    .load(&kek, "mk", 1, algorithm, &imported.blob)
                    .is_err()
            );
        }
    }
}
