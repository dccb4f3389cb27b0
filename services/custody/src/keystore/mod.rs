//! Where master keys live and where cryptograms and PIV PUKs are computed. One trait, two
//! backends:
//!
//! * [`SoftKeystore`] (`keystore.backend = "soft"`, the default): master keys wrapped under
//!   the KEK in custody's database, unwrapped into zeroizing memory while unsealed.
//! * [`Pkcs11Keystore`] (`keystore.backend = "pkcs11"`): master keys are non-extractable
//!   objects in an HSM; the database row only holds a KEK-wrapped reference to the object.
//!
//! Both give byte-identical results for the same master key (the shared vectors run through
//! both in tests/tests/custody.rs and tests/tests/custody_pkcs11.rs, PUKs through both in
//! tests/tests/custody_puk.rs).

mod pkcs11;
mod soft;

pub use pkcs11::{Pkcs11Key, Pkcs11Keystore, derived_block};
pub use soft::SoftKeystore;

/// The PKCS#11 crate the HSM backend is built on, for tools and tests that inspect a token.
pub use cryptoki;

use cms_cardcrypto::{KeyAlgorithm, Puk, PukInput, Scheme, SecretKey, Zeroizing};
use cms_proto::custody::v1::Backend;

use crate::config::{KeystoreBackend, KeystoreSettings};
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
    #[error(transparent)]
    Puk(#[from] cms_cardcrypto::PukError),
    /// A configuration problem found at start: names the config key.
    #[error("{key}: {message}")]
    Config { key: &'static str, message: String },
    /// A PKCS#11 call failed (function and return value only: never data).
    #[error("HSM: {operation}: {detail}")]
    Hsm {
        operation: &'static str,
        detail: String,
    },
    /// The object a stored master key refers to is not (or no longer) on the token.
    #[error("HSM: master key object {label} is not on the token")]
    MissingObject { label: String },
    /// The stored master key refers to an HSM object that does not fit its row.
    #[error("HSM: master key object {label}: {problem}")]
    WrongObject { label: String, problem: String },
    /// The key check value the HSM computed for an imported key differs from the host's.
    #[error("the HSM's key check value of the imported key differs from the host's")]
    KcvMismatch,
    /// The stored form of a master key was made by the other backend.
    #[error("stored master key was made by the {made_by} keystore backend, this is {running}")]
    OtherBackend {
        made_by: crate::config::KeystoreBackend,
        running: crate::config::KeystoreBackend,
    },
    #[error("the system random generator failed")]
    Random,
}

/// A master key version made usable.
pub enum MasterKeyHandle {
    Soft(SecretKey),
    Pkcs11(Pkcs11Key),
}

impl std::fmt::Debug for MasterKeyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Soft(key) => write!(f, "Soft({key:?})"),
            Self::Pkcs11(key) => write!(f, "Pkcs11({key:?})"),
        }
    }
}

/// A new master key version as stored: what goes into `master_key.wrapped`, and its key check
/// value (first 3 bytes of E_K(zero block)).
#[derive(Debug)]
pub struct Stored {
    pub blob: Vec<u8>,
    pub kcv: [u8; 3],
}

pub trait Keystore: Send + Sync {
    fn backend(&self) -> Backend;

    /// True when a call waits on a device (an HSM) rather than computing in memory: see
    /// [`on_keystore`].
    fn blocks(&self) -> bool {
        false
    }

    /// Creates a new random master key version (inside the HSM for pkcs11); returns what to
    /// persist.
    fn generate(
        &self,
        kek: &Kek,
        reference: &str,
        version: u32,
        algorithm: KeyAlgorithm,
    ) -> Result<Stored, KeystoreError>;

    /// Takes a master key version assembled from ceremony components; returns what to persist.
    fn import(
        &self,
        kek: &Kek,
        reference: &str,
        version: u32,
        key: &SecretKey,
    ) -> Result<Stored, KeystoreError>;

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

    /// A PIV card's PUK under this master key ([`cms_cardcrypto::puk`]): the PRF runs where
    /// the master key lives (inside the HSM for pkcs11) and only the digits come out.
    fn puk(&self, master: &MasterKeyHandle, input: &PukInput<'_>) -> Result<Puk, KeystoreError>;
}

/// Runs `call` on `keystore`: inline when it computes in memory, on a blocking thread when it
/// waits on an HSM. A network HSM answers in milliseconds, and a runtime worker blocked that
/// long holds up every request queued behind it (there is one worker per core).
pub async fn on_keystore<T: Send + 'static>(
    keystore: &std::sync::Arc<dyn Keystore>,
    call: impl FnOnce(&dyn Keystore) -> Result<T, KeystoreError> + Send + 'static,
) -> Result<T, KeystoreError> {
    if !keystore.blocks() {
        return call(keystore.as_ref());
    }
    let keystore = keystore.clone();
    tokio::task::spawn_blocking(move || call(keystore.as_ref()))
        .await
        .unwrap_or_else(|_| {
            Err(KeystoreError::Hsm {
                operation: "call",
                detail: "the HSM call did not finish".into(),
            })
        })
}

/// The inputs of one cryptogram.
pub struct CryptogramInput<'a> {
    pub scheme: Scheme,
    pub card_id: &'a [u8],
    pub key_version: u32,
    pub admin_algorithm: KeyAlgorithm,
    pub challenge: &'a [u8],
}

/// The keystore `settings` ask for. Opening a PKCS#11 module blocks (it loads the module,
/// logs in and runs known-answer tests on the token): call from a blocking context.
pub fn open(settings: &KeystoreSettings) -> Result<std::sync::Arc<dyn Keystore>, KeystoreError> {
    Ok(match settings.backend {
        KeystoreBackend::Soft => std::sync::Arc::new(SoftKeystore),
        KeystoreBackend::Pkcs11 => std::sync::Arc::new(Pkcs11Keystore::open(settings)?),
    })
}

pub(crate) fn binding(reference: &str, version: u32) -> Binding<'_> {
    Binding {
        key_id: reference,
        purpose: MASTER_KEY_PURPOSE,
        version,
    }
}
