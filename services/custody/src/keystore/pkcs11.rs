//! The `pkcs11` backend: master keys are non-extractable objects in an HSM (tests use
//! SoftHSM2).
//!
//! * Master keys are token objects (`CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`, not
//!   `CKA_EXTRACTABLE`, not modifiable or copyable) labelled `cms-mk:<reference>:<version>` with
//!   a random 16-byte `CKA_ID`. They may do only what their algorithm's uses need
//!   ([`master_attributes`]): a 2-key 3DES key (`gp-emv`, `gp-visa2`) may only derive, so the
//!   token PIN alone does not make it an encryption oracle that turns derivation data into
//!   per-card keys. `generate` makes them inside the HSM (CKM_DES2_KEY_GEN,
//!   CKM_DES3_KEY_GEN, CKM_AES_KEY_GEN); `import` creates them with C_CreateObject from the
//!   ceremony's combined components (which are necessarily in host memory at that point).
//!   The key check value is computed inside the HSM (E_K(zero block), ECB) and, for an
//!   import, compared with the host's.
//! * The blob stored in `master_key.wrapped` is the object's `CKA_ID`, wrapped under the KEK
//!   with the same binding (reference, purpose, version) as a soft key: a blob moved to
//!   another row, cut or flipped fails to open, and nothing is usable while custody is sealed.
//! * `gp-emv` / `gp-visa2`: C_DeriveKey with CKM_DES3_ECB_ENCRYPT_DATA over
//!   [`cms_cardcrypto::gp_derivation_data`] gives a session-only, sensitive, non-extractable
//!   2-key 3DES key K16 (the 24-byte admin key K16 || K16[0..8] is the same key), the HSM
//!   encrypts the challenge with it (CKM_DES3_ECB), and the key is destroyed: the per-card
//!   key never leaves the HSM.
//! * `gp-kdf3` / `sp800-108-cmac`: the derivation is AES-CMAC based, and PKCS#11 2.40 has no
//!   derive mechanism built on CMAC (CKM_AES_ECB_ENCRYPT_DATA only encrypts). Each CMAC block
//!   is computed with C_Sign(CKM_AES_CMAC) on the master-key object, so the master key stays
//!   in the HSM; the per-card key is assembled in zeroizing host memory for the one ECB block
//!   of the response and wiped right after. With a PKCS#11 3.0 token offering
//!   CKM_SP800_108_COUNTER_KDF with an AES-CMAC PRF (over
//!   [`cms_cardcrypto::sp800_108_fixed_input`]) the `sp800-108-cmac` key could stay inside
//!   as well; SoftHSM2 2.6 does not offer it.
//! * PIV PUKs ([`cms_cardcrypto::puk`]): the PRF runs on the master-key object and only the
//!   digits come out. AES master keys: C_Sign(CKM_AES_CMAC) per block. 3DES master keys may
//!   not sign, so TDES-CMAC is assembled block by block ([`cms_cardcrypto::cmac_by_blocks`]):
//!   3-key 3DES with C_Encrypt(CKM_DES3_ECB); 2-key 3DES, which may only derive, with
//!   C_DeriveKey(CKM_DES3_ECB_ENCRYPT_DATA) into a readable 8-byte session object that is
//!   destroyed at once ([`derived_block`]; also its key check value). The chaining values pass
//!   through zeroizing host memory, the key never does.
//!
//! What derive-only does not stop: a token that lets C_DeriveKey make a non-sensitive key
//! (SoftHSM2 does; PKCS#11 2.40 has no attribute that forbids it, 3.0's CKA_DERIVE_TEMPLATE
//! is not in cryptoki 0.12) still hands E_K(data) to whoever holds the PIN. Production HSMs
//! should enforce sensitive derived keys by policy; custody then needs AES (or 3-key 3DES)
//! PUK master keys.
//!
//! Sessions come from a small pool (a PKCS#11 session serves one thread at a time); the login
//! is per application and token, so it is done once at start and kept alive by one session
//! that stays open. At start custody checks that the token offers every mechanism it needs
//! and runs known-answer tests on the token with temporary session keys.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cms_cardcrypto::diversify::gp_kdf3_input;
use cms_cardcrypto::{
    CryptogramError, DiversifyError, KeyAlgorithm, Puk, PukInput, Scheme, SecretKey, Zeroizing,
    cmac_by_blocks, derive_puk_with, gp_derivation_data, sp800_108_fixed_input,
};
use cms_proto::custody::v1::Backend;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::misc::KeyDerivationStringData;
use cryptoki::mechanism::vendor_defined::VendorDefinedMechanism;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::{AuthPin, Ulong};
use zeroize::Zeroize;

use super::{CryptogramInput, Keystore, KeystoreError, MasterKeyHandle, Stored, binding};
use crate::config::KeystoreSettings;
use crate::wrap::Kek;

/// What a pkcs11 blob holds once unwrapped: this prefix, then the object's 16-byte CKA_ID.
/// 30 bytes in all: no key length, so a soft backend never takes it for key bytes.
const OBJECT_REF_MAGIC: &[u8; 14] = b"cms-pkcs11/v1:";
const ID_LEN: usize = 16;
const KCV_LEN: usize = 3;
const LABEL_PREFIX: &str = "cms-mk";

/// True when unwrapped blob bytes are a reference to an HSM object (made by this backend).
pub(super) fn is_object_reference(bytes: &[u8]) -> bool {
    bytes.len() == OBJECT_REF_MAGIC.len() + ID_LEN && bytes.starts_with(OBJECT_REF_MAGIC)
}

fn object_label(reference: &str, version: u32) -> String {
    format!("{LABEL_PREFIX}:{reference}:{version}")
}

/// CKM_DES3_ECB_ENCRYPT_DATA (0x1102, PKCS#11 2.40 "key derivation by data encryption").
/// cryptoki 0.12 knows the value but has no constructor for it: its `MechanismType` is built
/// only from constants, from a list of known values that leaves the *_ECB_ENCRYPT_DATA
/// family out, or from vendor-defined values.
fn des3_ecb_encrypt_data() -> MechanismType {
    const CKM_DES3_ECB_ENCRYPT_DATA: std::os::raw::c_ulong = 0x0000_1102;
    // SAFETY: FFI edge. `MechanismType` is `#[repr(transparent)]` over `CK_MECHANISM_TYPE`
    // (= `CK_ULONG` = `c_ulong`) in cryptoki 0.12 (pinned in Cargo.lock), has no invariant
    // beyond holding a mechanism number, and `transmute` checks the sizes at compile time.
    // The value is the standard CKM_DES3_ECB_ENCRYPT_DATA, whose parameter
    // (CK_KEY_DERIVATION_STRING_DATA) cryptoki builds safely as `KeyDerivationStringData`.
    #[allow(unsafe_code)]
    unsafe {
        std::mem::transmute::<std::os::raw::c_ulong, MechanismType>(CKM_DES3_ECB_ENCRYPT_DATA)
    }
}

/// A master key version on the token.
#[derive(Clone)]
pub struct Pkcs11Key {
    object: ObjectHandle,
    algorithm: KeyAlgorithm,
    label: String,
}

impl Pkcs11Key {
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }
}

impl std::fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("label", &self.label)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// Master keys as non-extractable objects in a PKCS#11 token.
pub struct Pkcs11Keystore {
    context: Pkcs11,
    slot: Slot,
    token_label: String,
    /// Kept to log in again if the token logs this application out (token reset).
    pin: AuthPin,
    idle: Mutex<Vec<Session>>,
    max_idle: usize,
    /// The login lasts while the application has a session with the token: this one stays.
    _login: Mutex<Session>,
}

impl std::fmt::Debug for Pkcs11Keystore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Keystore")
            .field("token_label", &self.token_label)
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

/// `function: return value`, one line, no data.
fn describe(e: &P11Error) -> String {
    match e {
        P11Error::Pkcs11(rv, function) => format!("C_{function:?} returned {}", rv_name(*rv)),
        other => other.to_string(),
    }
}

fn rv_name(rv: RvError) -> String {
    // `PinIncorrect` -> `CKR_PIN_INCORRECT`: the names HSM manuals and logs use.
    let mut name = String::from("CKR");
    for c in format!("{rv:?}").chars() {
        if c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

fn hsm(operation: &'static str) -> impl FnOnce(P11Error) -> KeystoreError {
    move |e| KeystoreError::Hsm {
        operation,
        detail: describe(&e),
    }
}

fn config(key: &'static str, message: impl Into<String>) -> KeystoreError {
    KeystoreError::Config {
        key,
        message: message.into(),
    }
}

/// The loaded modules of this process, by path. A module is initialised once per process
/// (C_Initialize) and never finalised or unloaded while custody runs: several keystores (a
/// restart in tests, say) share it.
static MODULES: Mutex<BTreeMap<PathBuf, Pkcs11>> = Mutex::new(BTreeMap::new());

fn load_module(module: &Path) -> Result<Pkcs11, KeystoreError> {
    if !module.is_file() {
        return Err(config(
            "keystore.module",
            format!(
                "{}: no such file (the PKCS#11 module of the HSM)",
                module.display()
            ),
        ));
    }
    let key = module.canonicalize().unwrap_or_else(|_| module.to_owned());
    let mut modules = MODULES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(context) = modules.get(&key) {
        return Ok(context.clone());
    }
    let context = Pkcs11::new(&key).map_err(|e| {
        config(
            "keystore.module",
            format!(
                "{}: cannot be loaded as a PKCS#11 module: {}",
                module.display(),
                describe(&e)
            ),
        )
    })?;
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(config(
                "keystore.module",
                format!(
                    "{}: C_Initialize failed: {}",
                    module.display(),
                    describe(&e)
                ),
            ));
        }
    }
    modules.insert(key, context.clone());
    Ok(context)
}

fn read_pin(path: &Path) -> Result<AuthPin, KeystoreError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        config(
            "keystore.pin_file",
            format!("{}: cannot be read: {e}", path.display()),
        )
    })?);
    let pin = text.trim_end_matches(['\r', '\n', ' ', '\t']);
    if pin.is_empty() {
        return Err(config(
            "keystore.pin_file",
            format!(
                "{}: is empty (it holds the token's user PIN)",
                path.display()
            ),
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %path.display(), "keystore.pin_file is readable by group or others: make it mode 0600");
        }
    }
    Ok(AuthPin::from(pin.to_owned()))
}

fn find_token(context: &Pkcs11, module: &Path, label: &str) -> Result<Slot, KeystoreError> {
    let slots = context
        .get_slots_with_token()
        .map_err(hsm("C_GetSlotList"))?;
    let mut found = Vec::new();
    let mut labels = Vec::new();
    for slot in slots {
        let Ok(info) = context.get_token_info(slot) else {
            continue;
        };
        let this = info.label().trim_end();
        if this == label && info.token_initialized() {
            found.push(slot);
        } else if !this.is_empty() {
            labels.push(format!("\"{this}\""));
        }
    }
    match found.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(config(
            "keystore.token_label",
            format!(
                "no token labelled \"{label}\" in {} (tokens present: {})",
                module.display(),
                if labels.is_empty() {
                    "none".to_owned()
                } else {
                    labels.join(", ")
                }
            ),
        )),
        _ => Err(config(
            "keystore.token_label",
            format!(
                "{} tokens are labelled \"{label}\" in {}: give each token its own label",
                found.len(),
                module.display()
            ),
        )),
    }
}

fn login(session: &Session, pin: &AuthPin) -> Result<(), P11Error> {
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The mechanisms custody needs, by name for the message when one is missing.
fn required_mechanisms() -> [(MechanismType, &'static str); 7] {
    [
        (MechanismType::DES2_KEY_GEN, "CKM_DES2_KEY_GEN"),
        (MechanismType::DES3_KEY_GEN, "CKM_DES3_KEY_GEN"),
        (MechanismType::AES_KEY_GEN, "CKM_AES_KEY_GEN"),
        (MechanismType::DES3_ECB, "CKM_DES3_ECB"),
        (MechanismType::AES_ECB, "CKM_AES_ECB"),
        (MechanismType::AES_CMAC, "CKM_AES_CMAC"),
        (des3_ecb_encrypt_data(), "CKM_DES3_ECB_ENCRYPT_DATA"),
    ]
}

fn key_type(algorithm: KeyAlgorithm) -> KeyType {
    match algorithm {
        KeyAlgorithm::Tdes2Key => KeyType::DES2,
        KeyAlgorithm::Tdes3Key => KeyType::DES3,
        KeyAlgorithm::Aes128 | KeyAlgorithm::Aes192 | KeyAlgorithm::Aes256 => KeyType::AES,
    }
}

fn ecb(algorithm: KeyAlgorithm) -> Mechanism<'static> {
    if algorithm.is_tdes() {
        Mechanism::Des3Ecb
    } else {
        Mechanism::AesEcb
    }
}

/// The attributes of a master-key object, besides its class, type and value.
fn master_attributes(
    algorithm: KeyAlgorithm,
    label: &str,
    id: &[u8],
    persistent: bool,
) -> Vec<Attribute> {
    vec![
        Attribute::Token(persistent),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
        // Only what custody does with it. 2-key 3DES (the GP schemes' master keys): derive
        // only; its key check value and PUK blocks come from derivations too. 3-key 3DES (PUK
        // PRF only; no scheme derives from it): encrypt. AES: the CMAC of its schemes and of
        // the PUK PRF (sign) and its key check value (encrypt); no derive mechanism builds
        // CMAC, so derive-only would not protect it.
        Attribute::Encrypt(!derive_only(algorithm)),
        Attribute::Decrypt(false),
        Attribute::Derive(derive_only(algorithm)),
        Attribute::Sign(algorithm.is_aes()),
        Attribute::Verify(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
    ]
}

/// True for the master keys that may only derive (see [`master_attributes`]).
fn derive_only(algorithm: KeyAlgorithm) -> bool {
    algorithm == KeyAlgorithm::Tdes2Key
}

/// E_K(`data`) (whole 3DES blocks) for a derive-only 3DES key: C_DeriveKey with
/// CKM_DES3_ECB_ENCRYPT_DATA into a session object that is readable (it holds what C_Encrypt
/// would return) and destroyed before this returns. Public for tests that check a token's
/// keys as any holder of its PIN could.
pub fn derived_block(
    session: &Session,
    object: ObjectHandle,
    data: &[u8],
) -> Result<Zeroizing<Vec<u8>>, P11Error> {
    let params = KeyDerivationStringData::new(data);
    let mechanism = Mechanism::VendorDefined(VendorDefinedMechanism::new(
        des3_ecb_encrypt_data(),
        Some(&params),
    ));
    let len = Ulong::try_from(data.len()).unwrap_or_else(|_| Ulong::from(0));
    let block = session.derive_key(
        &mechanism,
        object,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
            Attribute::ValueLen(len),
        ],
    )?;
    let value = session.get_attributes(block, &[AttributeType::Value]);
    let destroyed = session.destroy_object(block);
    let mut value = value?;
    destroyed?;
    let out = value.iter_mut().find_map(|attribute| match attribute {
        Attribute::Value(bytes) => Some(Zeroizing::new(std::mem::take(bytes))),
        _ => None,
    });
    for attribute in &mut value {
        if let Attribute::Value(bytes) = attribute {
            bytes.zeroize();
        }
    }
    match out {
        Some(out) if out.len() == data.len() => Ok(out),
        _ => Err(P11Error::Pkcs11(
            RvError::KeySizeRange,
            cryptoki::context::Function::DeriveKey,
        )),
    }
}

/// First 3 bytes of E_K(zero block), computed by the token.
fn token_kcv(
    session: &Session,
    object: ObjectHandle,
    algorithm: KeyAlgorithm,
) -> Result<[u8; KCV_LEN], P11Error> {
    let block = vec![0u8; algorithm.block_len()];
    let out = if derive_only(algorithm) {
        derived_block(session, object, &block)?
    } else {
        Zeroizing::new(session.encrypt(&ecb(algorithm), object, &block)?)
    };
    let mut kcv = [0u8; KCV_LEN];
    if out.len() >= KCV_LEN {
        kcv.copy_from_slice(&out[..KCV_LEN]);
        Ok(kcv)
    } else {
        Err(P11Error::Pkcs11(
            RvError::EncryptedDataLenRange,
            cryptoki::context::Function::Encrypt,
        ))
    }
}

/// Checks the scheme against the master key and the admin-key length exactly as
/// `cms_cardcrypto::diversify` does, so both backends refuse the same requests the same way.
fn check_request(
    master: KeyAlgorithm,
    input: &CryptogramInput<'_>,
) -> Result<KeyAlgorithm, KeystoreError> {
    let scheme = input.scheme;
    if !scheme.master_algorithms().contains(&master) {
        return Err(DiversifyError::MasterKeyAlgorithm {
            scheme,
            got: master,
        }
        .into());
    }
    cms_cardcrypto::diversify::kdd(input.card_id)?;
    let out_len = input.admin_algorithm.key_len();
    let out_error = |expected: &[usize]| DiversifyError::OutputLength {
        scheme,
        got: out_len,
        expected: expected.to_vec(),
    };
    let admin = match scheme {
        Scheme::GpEmv | Scheme::GpVisa2 => match out_len {
            16 => KeyAlgorithm::Tdes2Key,
            24 => KeyAlgorithm::Tdes3Key,
            _ => return Err(out_error(&[16, 24]).into()),
        },
        Scheme::GpKdf3 => {
            if out_len != master.key_len() {
                return Err(out_error(&[master.key_len()]).into());
            }
            KeyAlgorithm::aes_for_len(out_len).ok_or_else(|| out_error(&[master.key_len()]))?
        }
        Scheme::Sp800108Cmac => {
            KeyAlgorithm::aes_for_len(out_len).ok_or_else(|| out_error(&[16, 24, 32]))?
        }
    };
    if input.challenge.len() != admin.block_len() {
        return Err(CryptogramError::ChallengeLength {
            algorithm: admin,
            expected: admin.block_len(),
            got: input.challenge.len(),
        }
        .into());
    }
    Ok(admin)
}

impl Pkcs11Keystore {
    /// Loads the module, finds the token, logs in with the PIN from `keystore.pin_file`,
    /// checks the mechanisms and runs the known-answer tests. Blocking.
    pub fn open(settings: &KeystoreSettings) -> Result<Self, KeystoreError> {
        let required =
            |key: &'static str| config(key, "is required when keystore.backend is \"pkcs11\"");
        let module = settings
            .module
            .as_deref()
            .ok_or_else(|| required("keystore.module"))?;
        let token_label = settings
            .token_label
            .as_deref()
            .filter(|l| !l.is_empty())
            .ok_or_else(|| required("keystore.token_label"))?;
        let pin_file = settings
            .pin_file
            .as_deref()
            .ok_or_else(|| required("keystore.pin_file"))?;
        let pin = read_pin(pin_file)?;
        let context = load_module(module)?;
        let slot = find_token(&context, module, token_label)?;
        let session = context
            .open_rw_session(slot)
            .map_err(hsm("C_OpenSession"))?;
        login(&session, &pin).map_err(|e| match e {
            P11Error::Pkcs11(
                rv @ (RvError::PinIncorrect
                | RvError::PinInvalid
                | RvError::PinLenRange
                | RvError::PinLocked
                | RvError::PinExpired),
                _,
            ) => config(
                "keystore.pin_file",
                format!(
                    "{}: token \"{token_label}\" refused the PIN it holds ({})",
                    pin_file.display(),
                    rv_name(rv)
                ),
            ),
            other => hsm("C_Login")(other),
        })?;
        let missing: Vec<&str> = required_mechanisms()
            .into_iter()
            .filter(|(mechanism, _)| context.get_mechanism_info(slot, *mechanism).is_err())
            .map(|(_, name)| name)
            .collect();
        if !missing.is_empty() {
            return Err(config(
                "keystore.module",
                format!(
                    "token \"{token_label}\" of {} does not offer {}",
                    module.display(),
                    missing.join(", ")
                ),
            ));
        }
        let keystore = Self {
            context,
            slot,
            token_label: token_label.to_owned(),
            pin,
            idle: Mutex::new(Vec::new()),
            max_idle: settings.sessions.max(1),
            _login: Mutex::new(session),
        };
        keystore.self_test()?;
        tracing::info!(token = %keystore.token_label, module = %module.display(), "PKCS#11 keystore ready");
        Ok(keystore)
    }

    /// Runs `f` on a pooled session. On CKR_USER_NOT_LOGGED_IN (the token logged this
    /// application out) it logs in again and retries once. A session that saw an error is
    /// closed rather than reused, which also destroys any session key it still holds.
    fn with_session<T>(
        &self,
        operation: &'static str,
        f: impl Fn(&Session) -> Result<T, P11Error>,
    ) -> Result<T, KeystoreError> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let session = match pooled {
            Some(session) => session,
            None => self
                .context
                .open_rw_session(self.slot)
                .map_err(hsm("C_OpenSession"))?,
        };
        let mut result = f(&session);
        if let Err(P11Error::Pkcs11(RvError::UserNotLoggedIn, _)) = result {
            login(&session, &self.pin).map_err(hsm("C_Login"))?;
            result = f(&session);
        }
        match result {
            Ok(value) => {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() < self.max_idle {
                    idle.push(session);
                }
                Ok(value)
            }
            Err(e) => Err(hsm(operation)(e)),
        }
    }

    fn reference_blob(
        &self,
        kek: &Kek,
        reference: &str,
        version: u32,
        id: &[u8; ID_LEN],
    ) -> Result<Vec<u8>, KeystoreError> {
        let mut payload = Vec::with_capacity(OBJECT_REF_MAGIC.len() + ID_LEN);
        payload.extend_from_slice(OBJECT_REF_MAGIC);
        payload.extend_from_slice(id);
        Ok(kek.wrap(binding(reference, version), &payload)?)
    }

    fn new_id() -> Result<[u8; ID_LEN], KeystoreError> {
        let mut id = [0u8; ID_LEN];
        crate::wrap::random(&mut id).map_err(|_| KeystoreError::Random)?;
        Ok(id)
    }

    /// Creates a key object from its bytes (import, and the self-test's session keys),
    /// checks the token's KCV against the host's, and returns it.
    fn create_key(
        &self,
        key: &SecretKey,
        label: &str,
        id: &[u8],
        persistent: bool,
    ) -> Result<(ObjectHandle, [u8; KCV_LEN]), KeystoreError> {
        let algorithm = key.algorithm();
        let mut template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(key_type(algorithm)),
            Attribute::Value(key.expose_bytes().to_vec()),
        ];
        template.extend(master_attributes(algorithm, label, id, persistent));
        let created = self.with_session("C_CreateObject", |session| {
            let object = session.create_object(&template)?;
            match token_kcv(session, object, algorithm) {
                Ok(kcv) => Ok((object, kcv)),
                Err(e) => {
                    let _ = session.destroy_object(object);
                    Err(e)
                }
            }
        });
        for attribute in &mut template {
            if let Attribute::Value(bytes) = attribute {
                bytes.zeroize();
            }
        }
        let (object, kcv) = created?;
        if kcv != key.kcv() {
            let _ = self.with_session("C_DestroyObject", |s| s.destroy_object(object));
            return Err(KeystoreError::KcvMismatch);
        }
        Ok((object, kcv))
    }

    fn destroy(&self, object: ObjectHandle) -> Result<(), KeystoreError> {
        self.with_session("C_DestroyObject", |s| s.destroy_object(object))
    }

    /// The response for `input` under `key`; see the module documentation for what happens
    /// where.
    fn compute(
        &self,
        key: &Pkcs11Key,
        input: &CryptogramInput<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
        let admin = check_request(key.algorithm, input)?;
        match input.scheme {
            Scheme::GpEmv | Scheme::GpVisa2 => {
                let data = gp_derivation_data(input.scheme, input.card_id)?;
                self.with_session(
                    "derive and encrypt (CKM_DES3_ECB_ENCRYPT_DATA)",
                    |session| {
                        let params = KeyDerivationStringData::new(&data);
                        let mechanism = Mechanism::VendorDefined(VendorDefinedMechanism::new(
                            des3_ecb_encrypt_data(),
                            Some(&params),
                        ));
                        // K16 as a 2-key 3DES key: the admin key K16 || K16[0..8] encrypts the same.
                        let card_key = session.derive_key(
                            &mechanism,
                            key.object,
                            &[
                                Attribute::Class(ObjectClass::SECRET_KEY),
                                Attribute::KeyType(KeyType::DES2),
                                Attribute::Token(false),
                                Attribute::Private(true),
                                Attribute::Sensitive(true),
                                Attribute::Extractable(false),
                                Attribute::Encrypt(true),
                                Attribute::Decrypt(false),
                                Attribute::Derive(false),
                                Attribute::Sign(false),
                                Attribute::Wrap(false),
                            ],
                        )?;
                        let response =
                            session.encrypt(&Mechanism::Des3Ecb, card_key, input.challenge);
                        let destroyed = session.destroy_object(card_key);
                        let response = Zeroizing::new(response?);
                        destroyed?;
                        Ok(response)
                    },
                )
            }
            Scheme::GpKdf3 | Scheme::Sp800108Cmac => {
                let out_len = admin.key_len();
                let mut messages = Vec::new();
                if input.scheme == Scheme::GpKdf3 {
                    for counter in 1..=u8::try_from(out_len.div_ceil(16)).unwrap_or(u8::MAX) {
                        messages.push(gp_kdf3_input(input.card_id, counter)?.to_vec());
                    }
                } else {
                    let fixed = sp800_108_fixed_input(input.card_id, input.key_version, out_len)?;
                    for counter in 1..=u32::try_from(out_len.div_ceil(16)).unwrap_or(u32::MAX) {
                        let mut message = counter.to_be_bytes().to_vec();
                        message.extend_from_slice(&fixed);
                        messages.push(message);
                    }
                }
                let mut stream = self.with_session("C_Sign (CKM_AES_CMAC)", |session| {
                    let mut stream = Zeroizing::new(Vec::with_capacity(messages.len() * 16));
                    for message in &messages {
                        let block = Zeroizing::new(session.sign(
                            &Mechanism::AesCMac,
                            key.object,
                            message,
                        )?);
                        stream.extend_from_slice(&block);
                    }
                    Ok(stream)
                })?;
                if stream.len() < out_len {
                    return Err(KeystoreError::Hsm {
                        operation: "C_Sign (CKM_AES_CMAC)",
                        detail: "returned a short MAC".into(),
                    });
                }
                stream[out_len..].zeroize();
                stream.truncate(out_len);
                let card_key =
                    SecretKey::from_zeroizing(admin, stream).map_err(|_| KeystoreError::Corrupt)?;
                Ok(cms_cardcrypto::response(&card_key, input.challenge)?)
            }
        }
    }

    /// A card's PUK with the PRF computed on the master-key object; see the module
    /// documentation.
    fn derive_puk(&self, key: &Pkcs11Key, input: &PukInput<'_>) -> Result<Puk, KeystoreError> {
        let algorithm = key.algorithm;
        derive_puk_with(input, |message| {
            let block = if algorithm.is_aes() {
                self.with_session("C_Sign (CKM_AES_CMAC)", |session| {
                    session
                        .sign(&Mechanism::AesCMac, key.object, message)
                        .map(Zeroizing::new)
                })?
            } else {
                let operation = if derive_only(algorithm) {
                    "C_DeriveKey (CKM_DES3_ECB_ENCRYPT_DATA)"
                } else {
                    "C_Encrypt (CKM_DES3_ECB)"
                };
                self.with_session(operation, |session| {
                    cmac_by_blocks(algorithm, message, |block| {
                        let out = if derive_only(algorithm) {
                            derived_block(session, key.object, block)?
                        } else {
                            Zeroizing::new(session.encrypt(
                                &Mechanism::Des3Ecb,
                                key.object,
                                block,
                            )?)
                        };
                        if out.len() != block.len() {
                            return Err(P11Error::Pkcs11(
                                RvError::EncryptedDataLenRange,
                                cryptoki::context::Function::Encrypt,
                            ));
                        }
                        block.copy_from_slice(&out);
                        Ok(())
                    })
                })?
            };
            if block.len() != algorithm.block_len() {
                return Err(KeystoreError::Hsm {
                    operation: "PUK PRF",
                    detail: "returned a MAC of the wrong length".into(),
                });
            }
            Ok(block)
        })
    }

    /// Known-answer tests on the token with temporary session keys (the shared vectors'
    /// master keys), one per derivation path.
    fn self_test(&self) -> Result<(), KeystoreError> {
        struct Kat {
            name: &'static str,
            scheme: Scheme,
            master: KeyAlgorithm,
            admin: KeyAlgorithm,
            card: &'static str,
            version: u32,
            challenge: &'static str,
            response: &'static str,
        }
        const MASTER: &str = "404142434445464748494A4B4C4D4E4F";
        let kats = [
            Kat {
                name: "gp-emv",
                scheme: Scheme::GpEmv,
                master: KeyAlgorithm::Tdes2Key,
                admin: KeyAlgorithm::Tdes3Key,
                card: "00010203040506070809",
                version: 1,
                challenge: "1603EBDF1C8A2E72",
                response: "9CB2DC8314AFA496",
            },
            Kat {
                name: "gp-kdf3",
                scheme: Scheme::GpKdf3,
                master: KeyAlgorithm::Aes128,
                admin: KeyAlgorithm::Aes128,
                card: "00010203040506070809",
                version: 1,
                challenge: "00112233445566778899AABBCCDDEEFF",
                response: "EB9CB99A0C29CD54B0372458E362354F",
            },
            Kat {
                name: "sp800-108-cmac",
                scheme: Scheme::Sp800108Cmac,
                master: KeyAlgorithm::Aes128,
                admin: KeyAlgorithm::Aes128,
                card: "6F1D2B3C4D5E6F708192A3B4C5D6E7F8",
                version: 1,
                challenge: "000102030405060708090A0B0C0D0E0F",
                response: "30B96F7C6A001719C53957054B614C68",
            },
        ];
        let failed = |name: &str, why: String| {
            config(
                "keystore.module",
                format!(
                    "known-answer test {name} on token \"{}\" failed: {why}",
                    self.token_label
                ),
            )
        };
        for kat in kats {
            let master =
                SecretKey::new(kat.master, &hex(MASTER)).map_err(|_| KeystoreError::Corrupt)?;
            let (object, _) = self
                .create_key(&master, "cms-self-test", b"cms-self-test", false)
                .map_err(|e| failed(kat.name, e.to_string()))?;
            let key = Pkcs11Key {
                object,
                algorithm: kat.master,
                label: "cms-self-test".into(),
            };
            let card = hex(kat.card);
            let challenge = hex(kat.challenge);
            let result = self.compute(
                &key,
                &CryptogramInput {
                    scheme: kat.scheme,
                    card_id: &card,
                    key_version: kat.version,
                    admin_algorithm: kat.admin,
                    challenge: &challenge,
                },
            );
            let _ = self.destroy(object);
            match result {
                Ok(response) if response.as_slice() == hex(kat.response).as_slice() => {}
                Ok(_) => return Err(failed(kat.name, "wrong answer".into())),
                Err(e) => return Err(failed(kat.name, e.to_string())),
            }
        }
        // PIV PUKs, one per PRF path (cms_cardcrypto::puk's known answers).
        let card = hex("6F1D2B3C4D5E6F708192A3B4C5D6E7F8");
        for (name, algorithm, want) in [
            ("puk aes-cmac", KeyAlgorithm::Aes128, "69910623"),
            ("puk 3des-cmac", KeyAlgorithm::Tdes2Key, "24326921"),
        ] {
            let master =
                SecretKey::new(algorithm, &hex(MASTER)).map_err(|_| KeystoreError::Corrupt)?;
            let (object, _) = self
                .create_key(&master, "cms-self-test", b"cms-self-test", false)
                .map_err(|e| failed(name, e.to_string()))?;
            let key = Pkcs11Key {
                object,
                algorithm,
                label: "cms-self-test".into(),
            };
            let result = self.derive_puk(
                &key,
                &PukInput {
                    card_id: &card,
                    master_key_version: 1,
                    puk_version: 1,
                    digits: 8,
                },
            );
            let _ = self.destroy(object);
            match result {
                Ok(puk) if puk.expose_digits() == want.as_bytes() => {}
                Ok(_) => return Err(failed(name, "wrong answer".into())),
                Err(e) => return Err(failed(name, e.to_string())),
            }
        }
        Ok(())
    }
}

/// The bytes of a known answer written in this file (a typo decodes to nothing, and fails).
fn hex(s: &str) -> Vec<u8> {
    data_encoding::HEXUPPER_PERMISSIVE
        .decode(s.as_bytes())
        .unwrap_or_default()
}

impl Keystore for Pkcs11Keystore {
    fn backend(&self) -> Backend {
        Backend::Pkcs11
    }

    fn blocks(&self) -> bool {
        true
    }

    fn generate(
        &self,
        kek: &Kek,
        reference: &str,
        version: u32,
        algorithm: KeyAlgorithm,
    ) -> Result<Stored, KeystoreError> {
        let id = Self::new_id()?;
        let label = object_label(reference, version);
        // The blob first: once the object exists nothing else can fail before it is returned.
        let blob = self.reference_blob(kek, reference, version, &id)?;
        let (mechanism, mut template) = match algorithm {
            KeyAlgorithm::Tdes2Key => (Mechanism::Des2KeyGen, Vec::new()),
            KeyAlgorithm::Tdes3Key => (Mechanism::Des3KeyGen, Vec::new()),
            KeyAlgorithm::Aes128 | KeyAlgorithm::Aes192 | KeyAlgorithm::Aes256 => {
                let len =
                    Ulong::try_from(algorithm.key_len()).map_err(|_| KeystoreError::Corrupt)?;
                (Mechanism::AesKeyGen, vec![Attribute::ValueLen(len)])
            }
        };
        template.push(Attribute::Class(ObjectClass::SECRET_KEY));
        template.push(Attribute::KeyType(key_type(algorithm)));
        template.extend(master_attributes(algorithm, &label, &id, true));
        let kcv = self.with_session("C_GenerateKey", |session| {
            let object = session.generate_key(&mechanism, &template)?;
            match token_kcv(session, object, algorithm) {
                Ok(kcv) => Ok(kcv),
                Err(e) => {
                    let _ = session.destroy_object(object);
                    Err(e)
                }
            }
        })?;
        tracing::info!(%label, %algorithm, "master key generated inside the HSM");
        Ok(Stored { blob, kcv })
    }

    fn import(
        &self,
        kek: &Kek,
        reference: &str,
        version: u32,
        key: &SecretKey,
    ) -> Result<Stored, KeystoreError> {
        let id = Self::new_id()?;
        let label = object_label(reference, version);
        let blob = self.reference_blob(kek, reference, version, &id)?;
        let (_, kcv) = self.create_key(key, &label, &id, true)?;
        tracing::info!(%label, algorithm = %key.algorithm(), "master key imported into the HSM");
        Ok(Stored { blob, kcv })
    }

    fn load(
        &self,
        kek: &Kek,
        reference: &str,
        version: u32,
        algorithm: KeyAlgorithm,
        blob: &[u8],
    ) -> Result<MasterKeyHandle, KeystoreError> {
        let payload = kek.unwrap(binding(reference, version), blob)?;
        if !is_object_reference(&payload) {
            return Err(KeystoreError::OtherBackend {
                made_by: "soft",
                running: "pkcs11",
            });
        }
        let id = payload[OBJECT_REF_MAGIC.len()..].to_vec();
        let label = object_label(reference, version);
        let found = self.with_session("C_FindObjects", |session| {
            session.find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Token(true),
                Attribute::Id(id.clone()),
            ])
        })?;
        let object = match found.as_slice() {
            [object] => *object,
            [] => return Err(KeystoreError::MissingObject { label }),
            _ => {
                return Err(KeystoreError::WrongObject {
                    label,
                    problem: format!("{} objects have its CKA_ID", found.len()),
                });
            }
        };
        let attributes = self.with_session("C_GetAttributeValue", |session| {
            session.get_attributes(
                object,
                &[
                    AttributeType::Label,
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Encrypt,
                ],
            )
        })?;
        let wrong = |problem: &str| KeystoreError::WrongObject {
            label: label.clone(),
            problem: problem.to_owned(),
        };
        let mut secure = (false, false);
        for attribute in &attributes {
            match attribute {
                Attribute::Label(bytes) if bytes.as_slice() != label.as_bytes() => {
                    return Err(wrong("its CKA_LABEL names another key version"));
                }
                Attribute::KeyType(t) if *t != key_type(algorithm) => {
                    return Err(wrong("its key type does not match the stored algorithm"));
                }
                Attribute::ValueLen(len)
                    if algorithm.is_aes()
                        && usize::try_from(**len).ok() != Some(algorithm.key_len()) =>
                {
                    return Err(wrong("its length does not match the stored algorithm"));
                }
                Attribute::Encrypt(true) if derive_only(algorithm) => {
                    // Made before master keys became derive-only; it still works.
                    tracing::warn!(%label, "master key object allows CKA_ENCRYPT: the token PIN can compute per-card keys with it; rotate the key to replace it");
                }
                Attribute::Sensitive(s) => secure.0 = *s,
                Attribute::Extractable(e) => secure.1 = !*e,
                _ => {}
            }
        }
        if secure != (true, true) {
            return Err(wrong("it is not sensitive, or it is extractable"));
        }
        Ok(MasterKeyHandle::Pkcs11(Pkcs11Key {
            object,
            algorithm,
            label,
        }))
    }

    fn cryptogram(
        &self,
        master: &MasterKeyHandle,
        input: &CryptogramInput<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
        let MasterKeyHandle::Pkcs11(key) = master else {
            return Err(KeystoreError::OtherBackend {
                made_by: "soft",
                running: "pkcs11",
            });
        };
        self.compute(key, input)
    }

    fn puk(&self, master: &MasterKeyHandle, input: &PukInput<'_>) -> Result<Puk, KeystoreError> {
        let MasterKeyHandle::Pkcs11(key) = master else {
            return Err(KeystoreError::OtherBackend {
                made_by: "soft",
                running: "pkcs11",
            });
        };
        self.derive_puk(key, input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_exactly_what_the_soft_backend_refuses() {
        let long = [7u8; 65];
        let cards: [&[u8]; 4] = [b"", b"card-1", &[1u8; 16], &long];
        for scheme in Scheme::ALL {
            for master in KeyAlgorithm::ALL {
                let key = SecretKey::new(master, &vec![0x42; master.key_len()]).unwrap();
                for admin in KeyAlgorithm::ALL {
                    for card in cards {
                        for challenge_len in [8, 16] {
                            let challenge = vec![3u8; challenge_len];
                            let soft =
                                cms_cardcrypto::diversify(scheme, &key, card, 1, admin.key_len())
                                    .map_err(KeystoreError::from)
                                    .and_then(|k| Ok(cms_cardcrypto::response(&k, &challenge)?));
                            let input = CryptogramInput {
                                scheme,
                                card_id: card,
                                key_version: 1,
                                admin_algorithm: admin,
                                challenge: &challenge,
                            };
                            let here = check_request(master, &input);
                            assert_eq!(
                                soft.as_ref().err().map(ToString::to_string),
                                here.as_ref().err().map(ToString::to_string),
                                "{scheme} {master} {admin} card {} challenge {challenge_len}",
                                card.len()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn object_references_are_no_key_length() {
        let mut payload = OBJECT_REF_MAGIC.to_vec();
        payload.extend_from_slice(&[0u8; ID_LEN]);
        assert!(is_object_reference(&payload));
        for algorithm in KeyAlgorithm::ALL {
            assert_ne!(payload.len(), algorithm.key_len());
        }
        assert!(!is_object_reference(&[0u8; 30]));
        assert!(!is_object_reference(&payload[..29]));
    }

    #[test]
    fn return_values_read_like_the_standard() {
        assert_eq!(rv_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(
            describe(&P11Error::Pkcs11(
                RvError::UserNotLoggedIn,
                cryptoki::context::Function::Login
            )),
            "C_Login returned CKR_USER_NOT_LOGGED_IN"
        );
        assert_eq!(*des3_ecb_encrypt_data(), 0x1102);
    }

    #[test]
    fn missing_settings_are_named() {
        let mut settings = KeystoreSettings {
            backend: crate::config::KeystoreBackend::Pkcs11,
            ..Default::default()
        };
        let err = Pkcs11Keystore::open(&settings).unwrap_err().to_string();
        assert!(err.starts_with("keystore.module: is required"), "{err}");
        settings.module = Some("/nonexistent/module.so".into());
        let err = Pkcs11Keystore::open(&settings).unwrap_err().to_string();
        assert!(
            err.starts_with("keystore.token_label: is required"),
            "{err}"
        );
        settings.token_label = Some("t".into());
        let err = Pkcs11Keystore::open(&settings).unwrap_err().to_string();
        assert!(err.starts_with("keystore.pin_file: is required"), "{err}");
        settings.pin_file = Some("/nonexistent/pin".into());
        let err = Pkcs11Keystore::open(&settings).unwrap_err().to_string();
        assert!(
            err.starts_with("keystore.pin_file: /nonexistent/pin"),
            "{err}"
        );
    }
}
