//! Where master keys live and where cryptograms are computed. One trait, two backends in the
//! design: `soft` (master keys wrapped under the KEK in custody's database, unwrapped into
//! zeroizing memory while unsealed) and `pkcs11` (non-extractable HSM objects; arrives with
//! its own change). Both must give byte-identical results for the same master key.

use cms_cardcrypto::{KeyAlgorithm, Scheme, SecretKey, Zeroizing};
use cms_proto::custody::v1::Backend;

use crate::wrap::{Binding, Kek, WrapError};

pub const MASTER_KEY_PURPOSE: &str = "master-key";

#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    #[error(transparent)]
    Wrap(#[from] WrapError),
    #[error("stored master key does not match its algorithm")]
    Corrupt,
    #[error(transparent)]
    Diversify(#[from] cms_cardcrypto::DiversifyError),
    #[error(transparent)]
    Cryptogram(#[from] cms_cardcrypto::CryptogramError),
}

/// A master key version made usable.
pub enum MasterKeyHandle {
    Soft(SecretKey),
}

impl std::fmt::Debug for MasterKeyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Soft(key) => write!(f, "Soft({key:?})"),
        }
    }
}

pub trait Keystore: Send + Sync {
    fn backend(&self) -> Backend;

    /// Protects a new master key version for storage; returns the blob to persist.
    fn store(
        &self,
        kek: &Kek,
        reference: &str,
        version: u32,
        key: &SecretKey,
    ) -> Result<Vec<u8>, KeystoreError>;

    /// Makes a stored master key version usable.
    fn load(
        &self,
        kek: &Kek,
        reference: &str,
        version: u32,
        algorithm: KeyAlgorithm,
        blob: &[u8],
    ) -> Result<MasterKeyHandle, KeystoreError>;

    /// response = E_K(challenge) with K = diversify(master, card): the per-card key never
    /// leaves this call.
    fn cryptogram(
        &self,
        master: &MasterKeyHandle,
        request: &CryptogramInput<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, KeystoreError>;
}

/// The inputs of one cryptogram.
pub struct CryptogramInput<'a> {
    pub scheme: Scheme,
    pub card_id: &'a [u8],
    pub key_version: u32,
    pub admin_algorithm: KeyAlgorithm,
    pub challenge: &'a [u8],
}

/// Master keys wrapped under the KEK in custody's own database.
#[derive(Debug, Default)]
pub struct SoftKeystore;

impl Keystore for SoftKeystore {
    fn backend(&self) -> Backend {
        Backend::Soft
    }

    fn store(
        &self,
        kek: &Kek,
        reference: &str,
        version: u32,
        key: &SecretKey,
    ) -> Result<Vec<u8>, KeystoreError> {
        Ok(kek.wrap(binding(reference, version), key.expose_bytes())?)
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
        let key = SecretKey::new(algorithm, &bytes).map_err(|_| KeystoreError::Corrupt)?;
        Ok(MasterKeyHandle::Soft(key))
    }

    fn cryptogram(
        &self,
        master: &MasterKeyHandle,
        input: &CryptogramInput<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
        let MasterKeyHandle::Soft(master) = master;
        let admin = cms_cardcrypto::diversify(
            input.scheme,
            master,
            input.card_id,
            input.key_version,
            input.admin_algorithm.key_len(),
        )?;
        Ok(cms_cardcrypto::response(&admin, input.challenge)?)
    }
}

fn binding(reference: &str, version: u32) -> Binding<'_> {
    Binding {
        key_id: reference,
        purpose: MASTER_KEY_PURPOSE,
        version,
    }
}
