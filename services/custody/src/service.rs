//! The CustodyService: seal state, master-key lifecycle, cryptograms and audit.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cms_cardcrypto::{KeyAlgorithm, Scheme, SecretKey, Zeroizing, checksum, parse_with_checksum};
use cms_proto::common::v1::{
    AuthContext, DiversificationScheme, KeyAlgorithm as ProtoAlgorithm, PageResponse,
};
use cms_proto::custody::v1 as pb;
use cms_proto::custody::v1::custody_service_server::CustodyService;
use cms_proto::custody::v1::{AuditEvent, AuditOutcome};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, Set,
};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::audit::{self, AuditLog, Event, Refusal, UsageClaim, Written};
use crate::config::{CallerScope, GuardSettings};
use crate::error::Error;
use crate::guards::{self, Caller, RateLimiter};
use crate::keyrules;
use crate::keystore::{CryptogramInput, Keystore, KeystoreError, MasterKeyHandle, on_keystore};
use crate::seal;
use crate::store::entities::{master_key, seal_meta, so_token};
use crate::wrap::{self, Fingerprint, Kek};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const IMPORT_TTL: Duration = Duration::from_secs(600);
const MAX_CARD_ID: usize = 64;
const MAX_REFERENCE: usize = 64;

enum Seal {
    Uninitialised,
    Sealed {
        threshold: u32,
        check: Vec<u8>,
        shares: Vec<Zeroizing<Vec<u8>>>,
    },
    Unsealed {
        kek: Arc<Kek>,
    },
}

struct Loaded {
    row: master_key::Model,
    algorithm: KeyAlgorithm,
    /// `None` when the stored form could not be opened (altered, moved or truncated).
    handle: Option<Arc<MasterKeyHandle>>,
    /// The backend that made it, when that is not the running one.
    made_by: Option<&'static str>,
}

impl Loaded {
    /// The usable handle, or why the stored form cannot be used.
    fn handle(&self) -> Result<Arc<MasterKeyHandle>, Error> {
        let (reference, version) = (&self.row.reference, self.row.version);
        let version = u32::try_from(version).unwrap_or(0);
        if let Some(handle) = &self.handle {
            return Ok(handle.clone());
        }
        Err(match self.made_by {
            Some(made_by) => Error::OtherBackend {
                reference: reference.clone(),
                version,
                made_by,
                running: if made_by == "soft" { "pkcs11" } else { "soft" },
            },
            None => Error::Precondition(format!(
                "master key {reference} version {version} cannot be opened: its stored form was altered"
            )),
        })
    }
}

struct State {
    seal: Seal,
    keys: BTreeMap<(String, u32), Loaded>,
}

/// Where a new master key version's bytes come from.
enum Material {
    Generate(KeyAlgorithm),
    Import(SecretKey),
}

impl Material {
    fn algorithm(&self) -> KeyAlgorithm {
        match self {
            Self::Generate(algorithm) => *algorithm,
            Self::Import(key) => key.algorithm(),
        }
    }
}

/// What a new master key version is, besides its bytes.
struct NewKey<'a> {
    reference: &'a str,
    version: u32,
    description: &'a str,
    origin: &'a str,
    event: AuditEvent,
}

struct Import {
    reference: String,
    algorithm: KeyAlgorithm,
    version: u32,
    expected: u32,
    received: u32,
    accumulator: Zeroizing<Vec<u8>>,
    /// Keyed fingerprints of the components accepted so far (a repeated one is refused).
    seen: Vec<Fingerprint>,
    description: String,
    started: Instant,
}

pub struct Custody {
    pub(crate) db: DatabaseConnection,
    pub(crate) audit: AuditLog,
    pub(crate) keystore: Arc<dyn Keystore>,
    pub(crate) callers: Vec<CallerScope>,
    pub(crate) guards: GuardSettings,
    pub(crate) limiter: RateLimiter,
    pub(crate) outstanding: Arc<Semaphore>,
    /// PUK releases and rotations one at a time: each decides on the card's state and writes
    /// its record before the next looks (see `puk`).
    pub(crate) puk_lock: tokio::sync::Mutex<()>,
    self_test: Result<(), String>,
    self_test_at: i64,
    state: RwLock<State>,
    imports: Mutex<HashMap<String, Import>>,
}

#[derive(Clone)]
pub struct Options {
    pub db: DatabaseConnection,
    pub keystore: Arc<dyn Keystore>,
    pub callers: Vec<CallerScope>,
    pub guards: GuardSettings,
    pub dev_seal_file: Option<std::path::PathBuf>,
    /// Where the audit chain's head is kept outside the database (see `audit::HeadFile`).
    pub audit_head_file: Option<std::path::PathBuf>,
    /// The PostgreSQL lease this instance serves under: the audit appends only while it holds.
    pub fence: Option<crate::lease::Fence>,
    /// The key-encryption key this process held when it last served (unsealed by custodian
    /// shares), so that a lease lost and taken again does not seal custody.
    pub unsealed: Option<Arc<Kek>>,
}

fn algorithm_from_proto(value: i32, field: &'static str) -> Result<KeyAlgorithm, Error> {
    Ok(
        match ProtoAlgorithm::try_from(value).unwrap_or(ProtoAlgorithm::Unspecified) {
            ProtoAlgorithm::Tdes2key => KeyAlgorithm::Tdes2Key,
            ProtoAlgorithm::Tdes3key => KeyAlgorithm::Tdes3Key,
            ProtoAlgorithm::Aes128 => KeyAlgorithm::Aes128,
            ProtoAlgorithm::Aes192 => KeyAlgorithm::Aes192,
            ProtoAlgorithm::Aes256 => KeyAlgorithm::Aes256,
            ProtoAlgorithm::Unspecified => {
                return Err(Error::Invalid {
                    field,
                    message: "an algorithm is required (3DES 2-key or 3-key, AES-128/192/256)"
                        .into(),
                });
            }
        },
    )
}

fn algorithm_to_proto(algorithm: KeyAlgorithm) -> ProtoAlgorithm {
    match algorithm {
        KeyAlgorithm::Tdes2Key => ProtoAlgorithm::Tdes2key,
        KeyAlgorithm::Tdes3Key => ProtoAlgorithm::Tdes3key,
        KeyAlgorithm::Aes128 => ProtoAlgorithm::Aes128,
        KeyAlgorithm::Aes192 => ProtoAlgorithm::Aes192,
        KeyAlgorithm::Aes256 => ProtoAlgorithm::Aes256,
    }
}

fn scheme_from_proto(value: i32) -> Result<Scheme, Error> {
    Ok(
        match DiversificationScheme::try_from(value).unwrap_or(DiversificationScheme::Unspecified) {
            DiversificationScheme::GpEmv => Scheme::GpEmv,
            DiversificationScheme::GpVisa2 => Scheme::GpVisa2,
            DiversificationScheme::GpKdf3 => Scheme::GpKdf3,
            DiversificationScheme::Sp800108Cmac => Scheme::Sp800108Cmac,
            DiversificationScheme::Unspecified => {
                return Err(Error::Invalid {
                    field: "scheme",
                    message: "a diversification scheme is required".into(),
                });
            }
        },
    )
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

fn check_reference(reference: &str) -> Result<(), Error> {
    let ok = !reference.is_empty()
        && reference.len() <= MAX_REFERENCE
        && reference
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid {
            field: "reference",
            message: format!(
                "a master key reference is 1 to {MAX_REFERENCE} characters of letters, digits, '-', '_' and '.'"
            ),
        })
    }
}

fn key_info(row: &master_key::Model, backend: pb::Backend, current: bool) -> pb::MasterKeyVersion {
    pb::MasterKeyVersion {
        reference: row.reference.clone(),
        version: u32::try_from(row.version).unwrap_or(0),
        algorithm: row
            .algorithm
            .parse::<KeyAlgorithm>()
            .map(|a| algorithm_to_proto(a) as i32)
            .unwrap_or(0),
        kcv: row.kcv.clone(),
        state: if row.state == "retired" {
            pb::MasterKeyState::Retired
        } else if current {
            pb::MasterKeyState::Current
        } else {
            pb::MasterKeyState::Active
        } as i32,
        origin: if row.origin == "imported" {
            pb::KeyOrigin::Imported
        } else {
            pb::KeyOrigin::Generated
        } as i32,
        backend: backend as i32,
        created_at: Some(audit::timestamp(row.created_at)),
        retired_at: row.retired_at.map(audit::timestamp),
        description: row.description.clone(),
    }
}

/// The non-secret parts of a request's context, for the audit record.
pub(crate) fn context(auth: Option<AuthContext>) -> AuthContext {
    auth.unwrap_or_default()
}

impl Custody {
    /// Opens custody: self-test, seal state (auto-unseal from a dev seal file), master keys.
    pub async fn open(options: Options) -> Result<Self, Error> {
        let self_test = crate::selftest::run(options.guards.fail_self_test);
        if let Err(why) = &self_test {
            tracing::error!(reason = %why, "self-test failed: custody refuses all work");
        }
        let retention_ms = i64::try_from(
            options
                .guards
                .per_card_window_secs
                .max(options.guards.replay_window_secs)
                .saturating_mul(1000),
        )
        .unwrap_or(i64::MAX);
        let audit = AuditLog::start_fenced(
            options.db.clone(),
            retention_ms,
            options.audit_head_file.map(audit::HeadFile::new),
            options.fence,
        )
        .await?;
        let meta = seal_meta::Entity::find_by_id(1).one(&options.db).await?;
        let seal = match (meta, &options.dev_seal_file) {
            (None, None) => Seal::Uninitialised,
            (None, Some(path)) => {
                let (kek, _) = seal::dev_file(path)?;
                seal_meta::ActiveModel {
                    id: Set(1),
                    threshold: Set(1),
                    share_count: Set(1),
                    kek_check: Set(kek.check_value()),
                    mode: Set("dev-file".into()),
                    created_at: Set(audit::now_ms()),
                }
                .insert(&options.db)
                .await?;
                tracing::warn!(path = %path.display(), "development seal file in use: not for production");
                Seal::Unsealed { kek: Arc::new(kek) }
            }
            (Some(meta), Some(path)) if meta.mode == "dev-file" => {
                let (kek, _) = seal::dev_file(path)?;
                if kek.check_value() != meta.kek_check {
                    return Err(Error::Seal(seal::SealError::DevFile {
                        path: path.display().to_string(),
                        reason: "does not hold this custody's key-encryption key".into(),
                    }));
                }
                Seal::Unsealed { kek: Arc::new(kek) }
            }
            // Unsealed in this process before (a lease lost and taken again): stays so.
            (Some(meta), _) => match options.unsealed {
                Some(kek) if kek.check_value() == meta.kek_check => Seal::Unsealed { kek },
                _ => Seal::Sealed {
                    threshold: u32::try_from(meta.threshold).unwrap_or(1),
                    check: meta.kek_check,
                    shares: Vec::new(),
                },
            },
        };
        let custody = Self {
            limiter: RateLimiter::new(&options.guards),
            outstanding: Arc::new(Semaphore::new(options.guards.max_outstanding.max(1))),
            puk_lock: tokio::sync::Mutex::new(()),
            db: options.db,
            audit,
            keystore: options.keystore,
            callers: options.callers,
            guards: options.guards,
            self_test,
            self_test_at: audit::now_ms(),
            state: RwLock::new(State {
                seal,
                keys: BTreeMap::new(),
            }),
            imports: Mutex::new(HashMap::new()),
        };
        custody.reload_keys().await?;
        // A chain that does not verify gets nothing appended: custody serves reads only.
        if custody.audit.broken().is_none() {
            let self_test = Event::self_test(&custody.self_test, crate::selftest::TESTS);
            custody.audit.record(self_test, None).await?;
            let records = custody.audit.head().await?.sequence;
            let backend = match custody.keystore.backend() {
                pb::Backend::Pkcs11 => "pkcs11",
                _ => "soft",
            };
            let started = Event::startup(VERSION, backend, &custody.self_test, records);
            custody.audit.record(started, None).await?;
        }
        Ok(custody)
    }

    /// The key-encryption key while unsealed.
    pub(crate) fn unsealed_kek(&self) -> Option<Arc<Kek>> {
        match &self.read().seal {
            Seal::Unsealed { kek } => Some(kek.clone()),
            _ => None,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The KEK, or why there is none.
    pub(crate) fn kek(&self) -> Result<Arc<Kek>, Error> {
        self.self_test.as_ref().map_err(|_| Error::SelfTestFailed)?;
        if self.audit.broken().is_some() {
            return Err(Error::AuditUnavailable);
        }
        match &self.read().seal {
            Seal::Unsealed { kek } => Ok(kek.clone()),
            Seal::Sealed { .. } => Err(Error::Sealed),
            Seal::Uninitialised => Err(Error::Uninitialised),
        }
    }

    /// Loads (unwraps) every master key version while unsealed; forgets them while sealed.
    async fn reload_keys(&self) -> Result<(), Error> {
        let kek = match &self.read().seal {
            Seal::Unsealed { kek } => Some(kek.clone()),
            _ => None,
        };
        let mut keys = BTreeMap::new();
        if let Some(kek) = kek {
            for row in master_key::Entity::find().all(&self.db).await? {
                let loaded = self.load_row(&kek, row);
                keys.insert(
                    (
                        loaded.row.reference.clone(),
                        u32::try_from(loaded.row.version).unwrap_or(0),
                    ),
                    loaded,
                );
            }
        }
        self.write().keys = keys;
        Ok(())
    }

    fn load_row(&self, kek: &Kek, row: master_key::Model) -> Loaded {
        let algorithm = row.algorithm.parse::<KeyAlgorithm>().ok();
        let version = u32::try_from(row.version).unwrap_or(0);
        let mut made_by = None;
        let handle = algorithm.and_then(|algorithm| {
            match self
                .keystore
                .load(kek, &row.reference, version, algorithm, &row.wrapped)
            {
                Ok(handle) => Some(Arc::new(handle)),
                Err(e) => {
                    if let KeystoreError::OtherBackend { made_by: by, .. } = e {
                        made_by = Some(by);
                    }
                    tracing::error!(reference = %row.reference, version, error = %e, "master key cannot be opened");
                    None
                }
            }
        });
        Loaded {
            algorithm: algorithm.unwrap_or(KeyAlgorithm::Aes128),
            handle,
            made_by,
            row,
        }
    }

    /// A usable, unretired master key version, or why not (unknown, retired, unreadable).
    pub(crate) fn usable_key(
        &self,
        reference: &str,
        version: u32,
    ) -> Result<Arc<MasterKeyHandle>, Error> {
        let state = self.read();
        let loaded = state
            .keys
            .get(&(reference.to_owned(), version))
            .ok_or_else(|| Error::UnknownKey {
                reference: reference.to_owned(),
                version,
            })?;
        if loaded.row.state == "retired" {
            return Err(Error::Retired {
                reference: reference.to_owned(),
                version,
            });
        }
        loaded.handle()
    }

    fn current_version(&self, reference: &str) -> Option<u32> {
        self.read()
            .keys
            .range((reference.to_owned(), 0)..=(reference.to_owned(), u32::MAX))
            .filter(|(_, k)| k.row.state != "retired")
            .map(|((_, v), _)| *v)
            .max()
    }

    fn next_version(&self, reference: &str) -> u32 {
        self.read()
            .keys
            .range((reference.to_owned(), 0)..=(reference.to_owned(), u32::MAX))
            .map(|((_, v), _)| *v)
            .max()
            .unwrap_or(0)
            + 1
    }

    /// An import ceremony's key reference, version, components received and expected.
    pub(crate) fn import_progress(&self, import_id: &str) -> Option<(String, u32, u32, u32)> {
        let imports = self.imports.lock().unwrap_or_else(|p| p.into_inner());
        imports
            .get(import_id)
            .map(|i| (i.reference.clone(), i.version, i.received, i.expected))
    }

    /// Drops an import ceremony (its components are zeroized with it).
    pub(crate) fn forget_import(&self, import_id: &str) {
        let mut imports = self.imports.lock().unwrap_or_else(|p| p.into_inner());
        imports.remove(import_id);
    }

    fn info(&self, row: &master_key::Model) -> pb::MasterKeyVersion {
        let current = self.current_version(&row.reference) == u32::try_from(row.version).ok();
        key_info(row, self.keystore.backend(), current)
    }

    /// Stores a new master key version and audits it.
    async fn store_key(
        &self,
        caller: &Caller<'_>,
        auth: Option<AuthContext>,
        material: Material,
        new: NewKey<'_>,
    ) -> Result<master_key::Model, Error> {
        let NewKey {
            reference,
            version,
            description,
            origin,
            event,
        } = new;
        let kek = self.kek()?;
        let algorithm = material.algorithm();
        let stored = match &material {
            Material::Generate(algorithm) => self
                .keystore
                .generate(&kek, reference, version, *algorithm)?,
            Material::Import(key) => self.keystore.import(&kek, reference, version, key)?,
        };
        drop(material);
        let wrapped = stored.blob;
        let row = master_key::ActiveModel {
            reference: Set(reference.to_owned()),
            version: Set(i32::try_from(version).unwrap_or(i32::MAX)),
            algorithm: Set(algorithm.as_str().to_owned()),
            kcv: Set(hex_upper(&stored.kcv)),
            state: Set("active".into()),
            description: Set(description.to_owned()),
            origin: Set(origin.to_owned()),
            wrapped: Set(wrapped),
            created_at: Set(audit::now_ms()),
            retired_at: Set(None),
            ..Default::default()
        };
        let kcv = hex_upper(&stored.kcv);
        let facts = audit::events::NewKeyFacts {
            reference,
            version,
            algorithm: algorithm.as_str(),
            kcv: &kcv,
            origin,
        };
        let audited = Event::new_key(event, &caller.identity, context(auth), &facts);
        // The audit record goes first: a key that exists without its record must not.
        self.audit.record(audited, None).await?;
        let row = row.insert(&self.db).await.map_err(|e| match e {
            sea_orm::DbErr::RecordNotInserted => {
                Error::AlreadyExists(format!("master key {reference} version {version} exists"))
            }
            other => Error::Store(other),
        })?;
        let loaded = self.load_row(&kek, row.clone());
        self.write()
            .keys
            .insert((reference.to_owned(), version), loaded);
        Ok(row)
    }

    /// A PUK release names who asks and under which request id (common.proto): one without
    /// is refused, and audited, before anything else is looked at. A caller with no scope
    /// here is left to `release_puk`, which refuses (and audits) it as such.
    async fn puk_context(&self, request: &Request<pb::ReleasePivPukRequest>) -> Result<(), Error> {
        let Ok(caller) = guards::caller(&self.callers, request) else {
            return Ok(());
        };
        let req = request.get_ref();
        let auth = context(req.auth.clone());
        let Err(error) = guards::require_context(&auth) else {
            return Ok(());
        };
        let mut event = Event::new(
            AuditEvent::PukRelease,
            AuditOutcome::Refused,
            &caller.identity,
        );
        event.context = auth;
        event.context.card_id = req.card_id.clone();
        event.key_reference = req.master_key_reference.clone();
        event.key_version = req.master_key_version;
        event.reason = error.to_string();
        self.audit.record(event, None).await?;
        Err(error)
    }

    async fn refuse(
        &self,
        caller: &str,
        auth: &AuthContext,
        req: &pb::ComputeCryptogramRequest,
        error: Error,
    ) -> Error {
        let mut event = Event::new(AuditEvent::Cryptogram, AuditOutcome::Refused, caller);
        event.context = auth.clone();
        event.key_reference = req.master_key_reference.clone();
        event.key_version = req.master_key_version;
        event.reason = error.to_string();
        match self.audit.record(event, None).await {
            Ok(_) => error,
            Err(e) => e.into(),
        }
    }

    async fn cryptogram(
        &self,
        request: Request<pb::ComputeCryptogramRequest>,
    ) -> Result<pb::ComputeCryptogramResponse, Error> {
        let caller = guards::caller(&self.callers, &request)?;
        let identity = caller.identity.clone();
        let mut req = ChallengeWiped(request.into_inner());
        let mut auth = context(req.auth.take());
        auth.card_id = req.card_id.clone();
        let kek = self.kek()?;

        // Who may use which key comes before anything else is looked at.
        if let Err(e) = caller.require_key(&req.master_key_reference) {
            return Err(self.refuse(&identity, &auth, &req, e).await);
        }
        if let Err(e) = guards::require_context(&auth) {
            return Err(self.refuse(&identity, &auth, &req, e).await);
        }
        let _slot = self
            .outstanding
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::Overloaded)?;
        if let Err(e) = self.limiter.take(&identity) {
            return Err(self.refuse(&identity, &auth, &req, e).await);
        }
        match self.validate_and_compute(&req).await {
            Ok((response, scheme, challenge)) => {
                // A card is its identifier under its master key: the same identifier under
                // another key is another card.
                let card: [&[u8]; 2] = [req.master_key_reference.as_bytes(), &req.card_id];
                let claim = UsageClaim {
                    card_fp: kek.fingerprint("card", &card),
                    challenge_fp: kek
                        .fingerprint("card-challenge", &[card[0], card[1], &challenge]),
                    limit: self.guards.per_card_limit,
                    window_ms: i64::try_from(self.guards.per_card_window_secs * 1000)
                        .unwrap_or(i64::MAX),
                    replay_window_ms: i64::try_from(self.guards.replay_window_secs * 1000)
                        .unwrap_or(i64::MAX),
                };
                let mut event =
                    Event::new(AuditEvent::Cryptogram, AuditOutcome::Success, &identity);
                event.context = auth;
                event.key_reference = req.master_key_reference.clone();
                event.key_version = req.master_key_version;
                event.reason = ["scheme ", scheme.as_str()].concat();
                match self.audit.record(event, Some(claim)).await? {
                    Written::Recorded { seq } => Ok(pb::ComputeCryptogramResponse {
                        response_checksum: checksum(&response),
                        response: response.to_vec(),
                        master_key_version: req.master_key_version,
                        audit_sequence: seq,
                    }),
                    Written::Refused {
                        refusal: Refusal::Replay,
                        ..
                    } => Err(Error::Replay),
                    Written::Refused {
                        refusal: Refusal::CardLimit,
                        ..
                    } => Err(Error::CardLimit {
                        limit: self.guards.per_card_limit,
                        window_hours: self.guards.per_card_window_secs / 3600,
                    }),
                }
            }
            Err(e) => Err(self.refuse(&identity, &auth, &req, e).await),
        }
    }

    /// Checks the request and computes the card's response; also gives back the scheme and
    /// the challenge's bytes (the replay fingerprint is taken over them).
    async fn validate_and_compute(
        &self,
        req: &pb::ComputeCryptogramRequest,
    ) -> Result<(Zeroizing<Vec<u8>>, Scheme, Zeroizing<Vec<u8>>), Error> {
        if req.card_id.is_empty() || req.card_id.len() > MAX_CARD_ID {
            return Err(Error::Invalid {
                field: "card_id",
                message: format!("a card identifier is 1 to {MAX_CARD_ID} bytes"),
            });
        }
        let scheme = scheme_from_proto(req.scheme)?;
        let admin_algorithm = algorithm_from_proto(req.admin_key_algorithm, "admin_key_algorithm")?;
        keyrules::scheme_fits(scheme, admin_algorithm)?;
        let challenge = challenge_bytes(req, admin_algorithm.block_len())?;
        if challenge.len() != admin_algorithm.block_len() {
            return Err(Error::Invalid {
                field: "challenge",
                message: format!(
                    "a {} admin key answers a {}-byte challenge; got {} bytes",
                    admin_algorithm.as_str(),
                    admin_algorithm.block_len(),
                    challenge.len()
                ),
            });
        }
        let (handle, retired) = {
            let state = self.read();
            let loaded = state
                .keys
                .get(&(req.master_key_reference.clone(), req.master_key_version))
                .ok_or_else(|| Error::UnknownKey {
                    reference: req.master_key_reference.clone(),
                    version: req.master_key_version,
                })?;
            (loaded.handle(), loaded.row.state == "retired")
        };
        if retired {
            return Err(Error::Retired {
                reference: req.master_key_reference.clone(),
                version: req.master_key_version,
            });
        }
        let handle = handle?;
        let card_id = req.card_id.clone();
        let key_version = req.master_key_version;
        let (response, challenge) = on_keystore(&self.keystore, move |keystore| {
            let input = CryptogramInput {
                scheme,
                card_id: &card_id,
                key_version,
                admin_algorithm,
                challenge: &challenge,
            };
            Ok((keystore.cryptogram(&handle, &input)?, challenge))
        })
        .await
        .map_err(|e| match e {
            crate::keystore::KeystoreError::Diversify(d) => Error::Invalid {
                field: "scheme",
                message: d.to_string(),
            },
            other => Error::Keystore(other),
        })?;
        Ok((response, scheme, challenge))
    }
}

/// A cryptogram request whose challenge (raw or typed) is wiped when it is dropped, whatever
/// way the request ends.
struct ChallengeWiped(pb::ComputeCryptogramRequest);

impl std::ops::Deref for ChallengeWiped {
    type Target = pb::ComputeCryptogramRequest;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for ChallengeWiped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl ChallengeWiped {
    fn wipe(&mut self) {
        use zeroize::Zeroize;
        self.0.challenge.zeroize();
        if let Some(code) = &mut self.0.challenge_code {
            code.hex.zeroize();
            code.checksum.zeroize();
        }
    }
}

impl Drop for ChallengeWiped {
    fn drop(&mut self) {
        self.wipe();
    }
}

/// The challenge as raw bytes, from `challenge` or from the typed `challenge_code`. A typed
/// code must have the length the admin key answers (`block_len` bytes), or it is a
/// wrong-length code (a raw challenge's length is checked by the caller).
fn challenge_bytes(
    req: &pb::ComputeCryptogramRequest,
    block_len: usize,
) -> Result<Zeroizing<Vec<u8>>, Error> {
    match (&req.challenge_code, req.challenge.is_empty()) {
        (Some(code), true) => {
            parse_with_checksum(&code.hex, &code.checksum, &[block_len]).map_err(|source| {
                Error::Code {
                    field: "challenge_code",
                    source,
                }
            })
        }
        (None, false) => Ok(Zeroizing::new(req.challenge.clone())),
        (Some(_), false) => Err(Error::Invalid {
            field: "challenge",
            message: "give the challenge either as bytes or as a typed code, not both".into(),
        }),
        (None, true) => Err(Error::Invalid {
            field: "challenge",
            message: "a challenge is required".into(),
        }),
    }
}

type Rpc<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl CustodyService for Custody {
    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Rpc<pb::GetStatusResponse> {
        guards::caller(&self.callers, &request)?;
        let head = self.audit.head().await.map_err(Error::from)?;
        let so_token = so_token::Entity::find()
            .one(&self.db)
            .await
            .map_err(Error::from)?
            .is_some();
        let state = self.read();
        let (seal_state, progress, threshold, detail) = match &state.seal {
            Seal::Uninitialised => (
                pb::SealState::Uninitialised,
                0,
                0,
                "no key-encryption key yet: run `cmsctl custody init`".to_owned(),
            ),
            Seal::Sealed {
                threshold, shares, ..
            } => (
                pb::SealState::Sealed,
                u32::try_from(shares.len()).unwrap_or(0),
                *threshold,
                format!("sealed: {} of {threshold} shares given", shares.len()),
            ),
            Seal::Unsealed { .. } => (pb::SealState::Unsealed, 0, 0, String::new()),
        };
        let references: std::collections::BTreeSet<&str> =
            state.keys.keys().map(|(r, _)| r.as_str()).collect();
        let active = state
            .keys
            .values()
            .filter(|k| k.row.state != "retired")
            .count();
        let (passed, failed) = match &self.self_test {
            Ok(()) => (true, Vec::new()),
            Err(why) => (false, vec![why.clone()]),
        };
        let seal_state = if passed {
            seal_state
        } else {
            pb::SealState::Error
        };
        // A chain that did not verify at start: custody refuses all work but reads.
        let (seal_state, detail) = match self.audit.broken() {
            Some(why) => (pb::SealState::Error, format!("audit: {why}")),
            None => (seal_state, detail),
        };
        Ok(Response::new(pb::GetStatusResponse {
            seal_state: seal_state as i32,
            self_test: Some(pb::SelfTestResult {
                passed,
                ran_at: Some(audit::timestamp(self.self_test_at)),
                failed_tests: failed,
                tests_run: crate::selftest::TESTS,
            }),
            backend: self.keystore.backend() as i32,
            unseal_progress: progress,
            unseal_threshold: threshold,
            master_key_count: u32::try_from(references.len()).unwrap_or(u32::MAX),
            active_key_version_count: u32::try_from(active).unwrap_or(u32::MAX),
            audit_head: Some(head),
            so_token_initialised: so_token,
            detail: if passed {
                detail
            } else {
                "self-test failed".into()
            },
            version: VERSION.into(),
        }))
    }

    async fn init_seal(&self, request: Request<pb::InitSealRequest>) -> Rpc<pb::InitSealResponse> {
        let caller = guards::caller(&self.callers, &request)?;
        caller.require_admin()?;
        self.self_test.as_ref().map_err(|_| Error::SelfTestFailed)?;
        let req = request.into_inner();
        if !matches!(self.read().seal, Seal::Uninitialised) {
            return Err(Error::AlreadyExists("custody is already initialised".into()).into());
        }
        let kek = Kek::generate()
            .map_err(seal::SealError::from)
            .map_err(Error::from)?;
        let shares = seal::split(&kek, req.threshold, req.share_count).map_err(Error::from)?;
        let event = Event::seal_init(
            &caller.identity,
            context(req.auth),
            req.threshold,
            req.share_count,
        );
        self.audit.record(event, None).await.map_err(Error::from)?;
        seal_meta::ActiveModel {
            id: Set(1),
            threshold: Set(i32::try_from(req.threshold).unwrap_or(1)),
            share_count: Set(i32::try_from(req.share_count).unwrap_or(1)),
            kek_check: Set(kek.check_value()),
            mode: Set("shares".into()),
            created_at: Set(audit::now_ms()),
        }
        .insert(&self.db)
        .await
        .map_err(Error::from)?;
        self.write().seal = Seal::Unsealed { kek: Arc::new(kek) };
        Ok(Response::new(pb::InitSealResponse {
            shares: shares
                .into_iter()
                .map(|s| pb::Share {
                    index: s.index,
                    value: s.value.to_string(),
                    checksum: s.checksum,
                })
                .collect(),
            threshold: req.threshold,
            kcv: String::new(),
            seal_state: pb::SealState::Unsealed as i32,
        }))
    }

    async fn unseal(&self, request: Request<pb::UnsealRequest>) -> Rpc<pb::UnsealResponse> {
        let caller = guards::caller(&self.callers, &request)?;
        caller.require_admin()?;
        self.self_test.as_ref().map_err(|_| Error::SelfTestFailed)?;
        let req = request.into_inner();
        let share = match &req.share {
            Some(s) => {
                Some(seal::parse_share(s.index, &s.value, &s.checksum).map_err(Error::from)?)
            }
            None => None,
        };
        let outcome = {
            let mut state = self.write();
            match &mut state.seal {
                Seal::Uninitialised => return Err(Error::Uninitialised.into()),
                Seal::Unsealed { .. } => {
                    return Ok(Response::new(pb::UnsealResponse {
                        seal_state: pb::SealState::Unsealed as i32,
                        progress: 0,
                        threshold: 0,
                    }));
                }
                Seal::Sealed {
                    threshold,
                    check,
                    shares,
                } => {
                    if req.reset {
                        shares.clear();
                    }
                    if let Some(share) = share {
                        if shares.iter().any(|s| s[0] == share[0]) {
                            return Err(Error::from(seal::SealError::Duplicate(u32::from(
                                share[0],
                            )))
                            .into());
                        }
                        shares.push(share);
                    }
                    if u32::try_from(shares.len()).unwrap_or(0) >= *threshold {
                        let rebuilt = seal::combine(*threshold, shares, check);
                        shares.clear();
                        Some(rebuilt)
                    } else {
                        None
                    }
                }
            }
        };
        let event = Event::unsealed(&caller.identity, context(req.auth), &req.custodian_label);
        match outcome {
            None => {
                let (progress, threshold) = match &self.read().seal {
                    Seal::Sealed {
                        threshold, shares, ..
                    } => (u32::try_from(shares.len()).unwrap_or(0), *threshold),
                    _ => (0, 0),
                };
                Ok(Response::new(pb::UnsealResponse {
                    seal_state: pb::SealState::Sealed as i32,
                    progress,
                    threshold,
                }))
            }
            // Recorded as a refused administrative call by `audit::gate`.
            Some(Err(e)) => Err(Error::from(e).into()),
            Some(Ok(kek)) => {
                self.audit.record(event, None).await.map_err(Error::from)?;
                self.write().seal = Seal::Unsealed { kek: Arc::new(kek) };
                self.reload_keys().await?;
                tracing::info!("custody unsealed");
                Ok(Response::new(pb::UnsealResponse {
                    seal_state: pb::SealState::Unsealed as i32,
                    progress: 0,
                    threshold: 0,
                }))
            }
        }
    }

    async fn seal(&self, request: Request<pb::SealRequest>) -> Rpc<pb::SealResponse> {
        let caller = guards::caller(&self.callers, &request)?;
        caller.require_admin()?;
        let req = request.into_inner();
        let meta = seal_meta::Entity::find_by_id(1)
            .one(&self.db)
            .await
            .map_err(Error::from)?;
        let Some(meta) = meta else {
            return Err(Error::Uninitialised.into());
        };
        let event = Event::sealed(&caller.identity, context(req.auth), &req.reason);
        self.audit.record(event, None).await.map_err(Error::from)?;
        {
            let mut state = self.write();
            state.seal = Seal::Sealed {
                threshold: u32::try_from(meta.threshold).unwrap_or(1),
                check: meta.kek_check,
                shares: Vec::new(),
            };
            state.keys.clear();
        }
        tracing::warn!("custody sealed on request");
        Ok(Response::new(pb::SealResponse {
            seal_state: pb::SealState::Sealed as i32,
        }))
    }

    async fn generate_master_key(
        &self,
        request: Request<pb::GenerateMasterKeyRequest>,
    ) -> Rpc<pb::GenerateMasterKeyResponse> {
        let caller = guards::caller(&self.callers, &request)?;
        caller.require_admin()?;
        let req = request.into_inner();
        check_reference(&req.reference)?;
        let algorithm = algorithm_from_proto(req.algorithm, "algorithm")?;
        self.kek()?;
        if self.current_version(&req.reference).is_some() || self.next_version(&req.reference) > 1 {
            return Err(Error::AlreadyExists(format!(
                "master key {} exists; rotate it to make a new version",
                req.reference
            ))
            .into());
        }
        let row = self
            .store_key(
                &caller,
                req.auth,
                Material::Generate(algorithm),
                NewKey {
                    reference: &req.reference,
                    version: 1,
                    description: &req.description,
                    origin: "generated",
                    event: AuditEvent::MasterKeyGenerate,
                },
            )
            .await?;
        Ok(Response::new(pb::GenerateMasterKeyResponse {
            key: Some(self.info(&row)),
        }))
    }

    async fn rotate_master_key(
        &self,
        request: Request<pb::RotateMasterKeyRequest>,
    ) -> Rpc<pb::RotateMasterKeyResponse> {
        let caller = guards::caller(&self.callers, &request)?;
        caller.require_admin()?;
        let req = request.into_inner();
        check_reference(&req.reference)?;
        self.kek()?;
        let previous = {
            let state = self.read();
            let current = self.current_version(&req.reference);
            current.and_then(|v| {
                state
                    .keys
                    .get(&(req.reference.clone(), v))
                    .map(|k| (k.row.clone(), k.algorithm))
            })
        };
        let Some((previous, algorithm)) = previous else {
            return Err(Error::NotFound(format!("no active master key {}", req.reference)).into());
        };
        let version = self.next_version(&req.reference);
        let row = self
            .store_key(
                &caller,
                req.auth,
                Material::Generate(algorithm),
                NewKey {
                    reference: &req.reference,
                    version,
                    description: &req.description,
                    origin: "generated",
                    event: AuditEvent::MasterKeyRotate,
                },
            )
            .await?;
        Ok(Response::new(pb::RotateMasterKeyResponse {
            key: Some(self.info(&row)),
            previous: Some(self.info(&previous)),
        }))
    }

    async fn retire_master_key_version(
        &self,
        request: Request<pb::RetireMasterKeyVersionRequest>,
    ) -> Rpc<pb::RetireMasterKeyVersionResponse> {
        let caller = guards::caller(&self.callers, &request)?;
        caller.require_admin()?;
        let req = request.into_inner();
        self.kek()?;
        let row = master_key::Entity::find()
            .filter(master_key::Column::Reference.eq(req.reference.clone()))
            .filter(master_key::Column::Version.eq(i32::try_from(req.version).unwrap_or(-1)))
            .one(&self.db)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| Error::UnknownKey {
                reference: req.reference.clone(),
                version: req.version,
            })?;
        keyrules::may_retire(
            &req.reference,
            req.version,
            self.current_version(&req.reference),
        )?;
        let mut event = Event::new(
            AuditEvent::MasterKeyRetire,
            AuditOutcome::Success,
            &caller.identity,
        );
        event.context = context(req.auth);
        event.key_reference = req.reference.clone();
        event.key_version = req.version;
        event.reason = req.reason.chars().take(200).collect();
        self.audit.record(event, None).await.map_err(Error::from)?;
        let mut active: master_key::ActiveModel = row.into();
        active.state = Set("retired".into());
        active.retired_at = Set(Some(audit::now_ms()));
        let row = active.update(&self.db).await.map_err(Error::from)?;
        if let Some(loaded) = self
            .write()
            .keys
            .get_mut(&(req.reference.clone(), req.version))
        {
            loaded.row = row.clone();
        }
        Ok(Response::new(pb::RetireMasterKeyVersionResponse {
            key: Some(self.info(&row)),
        }))
    }

    async fn list_master_keys(
        &self,
        request: Request<pb::ListMasterKeysRequest>,
    ) -> Rpc<pb::ListMasterKeysResponse> {
        guards::caller(&self.callers, &request)?;
        let req = request.into_inner();
        let mut query = master_key::Entity::find()
            .order_by_asc(master_key::Column::Reference)
            .order_by_asc(master_key::Column::Version);
        if !req.reference.is_empty() {
            query = query.filter(master_key::Column::Reference.eq(req.reference.clone()));
        }
        if !req.include_retired {
            query = query.filter(master_key::Column::State.ne("retired"));
        }
        let rows = query.all(&self.db).await.map_err(Error::from)?;
        Ok(Response::new(pb::ListMasterKeysResponse {
            page: Some(PageResponse {
                next_page_token: String::new(),
                total_estimate: rows.len() as u64,
            }),
            keys: rows.iter().map(|r| self.info(r)).collect(),
        }))
    }

    async fn begin_key_import(
        &self,
        request: Request<pb::BeginKeyImportRequest>,
    ) -> Rpc<pb::BeginKeyImportResponse> {
        let caller = guards::caller(&self.callers, &request)?;
        caller.require_admin()?;
        let req = request.into_inner();
        check_reference(&req.reference)?;
        let algorithm = algorithm_from_proto(req.algorithm, "algorithm")?;
        self.kek()?;
        if !(2..=3).contains(&req.component_count) {
            return Err(Error::Invalid {
                field: "component_count",
                message: "a key ceremony uses 2 or 3 components".into(),
            }
            .into());
        }
        let mut id = [0u8; 16];
        wrap::random(&mut id)
            .map_err(seal::SealError::from)
            .map_err(Error::from)?;
        let import_id = hex_upper(&id);
        let version = self.next_version(&req.reference);
        let mut imports = self.imports.lock().unwrap_or_else(|p| p.into_inner());
        imports.retain(|_, i| i.started.elapsed() < IMPORT_TTL);
        if imports.values().any(|i| i.reference == req.reference) {
            return Err(Error::AlreadyExists(format!(
                "an import of {} is already in progress",
                req.reference
            ))
            .into());
        }
        imports.insert(
            import_id.clone(),
            Import {
                reference: req.reference,
                algorithm,
                version,
                expected: req.component_count,
                received: 0,
                accumulator: Zeroizing::new(vec![0; algorithm.key_len()]),
                seen: Vec::new(),
                description: req.description,
                started: Instant::now(),
            },
        );
        let expires = std::time::SystemTime::now() + IMPORT_TTL;
        Ok(Response::new(pb::BeginKeyImportResponse {
            import_id,
            version,
            expires_at: Some(expires.into()),
        }))
    }

    async fn add_key_component(
        &self,
        request: Request<pb::AddKeyComponentRequest>,
    ) -> Rpc<pb::AddKeyComponentResponse> {
        let caller = guards::caller(&self.callers, &request)?;
        caller.require_admin()?;
        let req = request.into_inner();
        let kek = self.kek()?;
        let mut imports = self.imports.lock().unwrap_or_else(|p| p.into_inner());
        let import = imports
            .get_mut(&req.import_id)
            .filter(|i| i.started.elapsed() < IMPORT_TTL)
            .ok_or_else(|| Error::NotFound("no such key import (or it expired)".into()))?;
        if import.received >= import.expected {
            return Err(Error::Precondition(
                "all components were already given; finish the import".into(),
            )
            .into());
        }
        let component =
            SecretKey::new(import.algorithm, &req.component).map_err(|_| Error::Invalid {
                field: "component",
                message: format!(
                    "a {} component is {} bytes",
                    import.algorithm.as_str(),
                    import.algorithm.key_len()
                ),
            })?;
        let kcv = hex_upper(&component.kcv());
        if !kcv_matches(&component, &req.expected_kcv) {
            return Err(Error::KcvMismatch(format!(
                "component {} does not have the key check value given; it was not accepted",
                import.received + 1
            ))
            .into());
        }
        let fingerprint = keyrules::check_component(
            &kek,
            &req.import_id,
            &component,
            import.received + 1,
            &import.seen,
        )?;
        import.seen.push(fingerprint);
        for (acc, byte) in import.accumulator.iter_mut().zip(component.expose_bytes()) {
            *acc ^= byte;
        }
        import.received += 1;
        Ok(Response::new(pb::AddKeyComponentResponse {
            components_received: import.received,
            components_expected: import.expected,
            component_kcv: kcv,
        }))
    }

    async fn finish_key_import(
        &self,
        request: Request<pb::FinishKeyImportRequest>,
    ) -> Rpc<pb::FinishKeyImportResponse> {
        let caller = guards::caller(&self.callers, &request)?;
        caller.require_admin()?;
        let req = request.into_inner();
        self.kek()?;
        let import = {
            let mut imports = self.imports.lock().unwrap_or_else(|p| p.into_inner());
            let ready = imports
                .get(&req.import_id)
                .filter(|i| i.started.elapsed() < IMPORT_TTL)
                .ok_or_else(|| Error::NotFound("no such key import (or it expired)".into()))?;
            if ready.received < ready.expected {
                return Err(Error::Precondition(format!(
                    "{} of {} components given",
                    ready.received, ready.expected
                ))
                .into());
            }
            imports
                .remove(&req.import_id)
                .ok_or_else(|| Error::NotFound("no such key import".into()))?
        };
        let key =
            SecretKey::new(import.algorithm, &import.accumulator).map_err(|_| Error::Invalid {
                field: "component",
                message: "the combined key is not valid for its algorithm".into(),
            })?;
        keyrules::check_combined(&key)?;
        if !kcv_matches(&key, &req.expected_kcv) {
            return Err(Error::KcvMismatch(
                "the combined key does not have the key check value given; nothing was stored"
                    .into(),
            )
            .into());
        }
        let row = self
            .store_key(
                &caller,
                req.auth,
                Material::Import(key),
                NewKey {
                    reference: &import.reference,
                    version: import.version,
                    description: &import.description,
                    origin: "imported",
                    event: AuditEvent::MasterKeyImport,
                },
            )
            .await?;
        Ok(Response::new(pb::FinishKeyImportResponse {
            key: Some(self.info(&row)),
        }))
    }

    async fn abort_key_import(
        &self,
        request: Request<pb::AbortKeyImportRequest>,
    ) -> Rpc<pb::AbortKeyImportResponse> {
        let caller = guards::caller(&self.callers, &request)?;
        caller.require_admin()?;
        let req = request.into_inner();
        self.imports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&req.import_id)
            .ok_or_else(|| Error::NotFound("no such key import".into()))?;
        Ok(Response::new(pb::AbortKeyImportResponse {}))
    }

    async fn compute_cryptogram(
        &self,
        request: Request<pb::ComputeCryptogramRequest>,
    ) -> Rpc<pb::ComputeCryptogramResponse> {
        Ok(Response::new(self.cryptogram(request).await?))
    }

    async fn release_piv_puk(
        &self,
        request: Request<pb::ReleasePivPukRequest>,
    ) -> Rpc<pb::ReleasePivPukResponse> {
        self.puk_context(&request).await?;
        Ok(Response::new(self.release_puk(request).await?))
    }

    async fn confirm_puk_rotation(
        &self,
        request: Request<pb::ConfirmPukRotationRequest>,
    ) -> Rpc<pb::ConfirmPukRotationResponse> {
        Ok(Response::new(self.confirm_rotation(request).await?))
    }

    async fn get_puk_status(
        &self,
        request: Request<pb::GetPukStatusRequest>,
    ) -> Rpc<pb::GetPukStatusResponse> {
        Ok(Response::new(self.puk_status(request).await?))
    }

    async fn query_audit(
        &self,
        request: Request<pb::QueryAuditRequest>,
    ) -> Rpc<pb::QueryAuditResponse> {
        let caller = guards::caller(&self.callers, &request)?;
        caller.require_admin()?;
        let query =
            audit::AuditQuery::from_request(request.get_ref()).map_err(|bad| Error::Invalid {
                field: bad.field,
                message: bad.message,
            })?;
        let page = self.audit.query(query).await.map_err(Error::from)?;
        Ok(Response::new(pb::QueryAuditResponse {
            records: page.records,
            page: Some(PageResponse {
                next_page_token: page.next_page_token,
                total_estimate: 0,
            }),
        }))
    }

    async fn export_audit_head(
        &self,
        request: Request<pb::ExportAuditHeadRequest>,
    ) -> Rpc<pb::ExportAuditHeadResponse> {
        let caller = guards::caller(&self.callers, &request)?;
        caller.require_admin()?;
        Ok(Response::new(pb::ExportAuditHeadResponse {
            head: Some(self.audit.head().await.map_err(Error::from)?),
        }))
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Rpc<pb::VerifyAuditResponse> {
        let caller = guards::caller(&self.callers, &request)?;
        caller.require_admin()?;
        let req = request.into_inner();
        let verdict = self
            .audit
            .verify_from(req.from_sequence, req.expected_head.as_ref())
            .await
            .map_err(Error::from)?;
        let (first_bad, reason, detail) = match &verdict.first_bad {
            Some(fault) => (
                fault.seq,
                fault.kind.code().to_owned(),
                fault.detail.clone(),
            ),
            None => (0, String::new(), String::new()),
        };
        Ok(Response::new(pb::VerifyAuditResponse {
            ok: verdict.first_bad.is_none(),
            records_checked: verdict.checked,
            first_bad_sequence: first_bad,
            reason,
            detail,
            head: Some(pb::AuditHead {
                sequence: verdict.head_seq,
                hash: verdict.head_hash,
                recorded_at: None,
                chain_id: audit::CHAIN_ID.into(),
            }),
        }))
    }

    async fn init_so_token(
        &self,
        request: Request<pb::InitSoTokenRequest>,
    ) -> Rpc<pb::InitSoTokenResponse> {
        let caller = guards::caller(&self.callers, &request)?;
        caller.require_admin()?;
        self.self_test.as_ref().map_err(|_| Error::SelfTestFailed)?;
        let req = request.into_inner();
        let label = if req.label.is_empty() {
            "so-token".to_owned()
        } else {
            req.label.clone()
        };
        check_reference(&label)?;
        let algorithm = algorithm_from_proto(req.algorithm, "algorithm")?;
        if req.share_count > 0
            && (req.share_threshold == 0 || req.share_threshold > req.share_count)
        {
            return Err(Error::Invalid {
                field: "share_threshold",
                message: "with shares, the threshold must be 1 to the share count".into(),
            }
            .into());
        }
        // One per installation (DESIGN 1): whatever its label.
        let exists = so_token::Entity::find()
            .one(&self.db)
            .await
            .map_err(Error::from)?;
        if let Some(existing) = exists {
            return Err(so_token_exists(&existing.label).into());
        }
        let mut failed = false;
        let key = cms_cardcrypto::SoUnblockKey::generate(algorithm, &mut |buf| {
            failed |= wrap::random(buf).is_err();
        })
        .map_err(|e| Error::Precondition(e.to_string()))?;
        if failed {
            return Err(Error::Precondition("the system random generator failed".into()).into());
        }
        let bytes = key.key().expose_bytes();
        let shares = if req.share_count > 0 {
            seal::split_secret(bytes, req.share_threshold, req.share_count).map_err(Error::from)?
        } else {
            Vec::new()
        };
        let kcv = hex_upper(&key.kcv());
        let mut auth = context(req.auth);
        auth.card_id = req.card_id.clone();
        let event = Event::so_token_init(
            &caller.identity,
            auth,
            &label,
            algorithm.as_str(),
            req.share_count,
            req.share_threshold,
        );
        self.audit.record(event, None).await.map_err(Error::from)?;
        let row = so_token::ActiveModel {
            // A fixed id: a racing second initialisation fails on the primary key.
            id: Set(SO_TOKEN_ID),
            label: Set(label),
            algorithm: Set(algorithm.as_str().to_owned()),
            kcv: Set(kcv.clone()),
            share_count: Set(i32::try_from(req.share_count).unwrap_or(0)),
            share_threshold: Set(i32::try_from(req.share_threshold).unwrap_or(0)),
            card_id: Set(req.card_id),
            created_at: Set(audit::now_ms()),
        }
        .insert(&self.db)
        .await
        .map_err(|e| match e.sql_err() {
            Some(sea_orm::SqlErr::UniqueConstraintViolation(_)) => {
                so_token_exists("initialised meanwhile")
            }
            _ => Error::from(e),
        })?;
        Ok(Response::new(pb::InitSoTokenResponse {
            so_unblock_key: Some(cms_proto::common::v1::TypedCode {
                hex: cms_cardcrypto::format_groups(bytes),
                checksum: checksum(bytes),
            }),
            shares: shares
                .into_iter()
                .map(|s| pb::Share {
                    index: s.index,
                    value: s.value.to_string(),
                    checksum: s.checksum,
                })
                .collect(),
            kcv,
            info: Some(so_info(&row)),
        }))
    }

    async fn get_so_token_info(
        &self,
        request: Request<pb::GetSoTokenInfoRequest>,
    ) -> Rpc<pb::GetSoTokenInfoResponse> {
        guards::caller(&self.callers, &request)?;
        let req = request.into_inner();
        let mut query = so_token::Entity::find().order_by_asc(so_token::Column::Id);
        if !req.label.is_empty() {
            query = query.filter(so_token::Column::Label.eq(req.label.clone()));
        }
        let row = query
            .one(&self.db)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| Error::NotFound("no SO token has been initialised".into()))?;
        Ok(Response::new(pb::GetSoTokenInfoResponse {
            info: Some(so_info(&row)),
        }))
    }
}

/// The id of the one SO token row.
const SO_TOKEN_ID: i64 = 1;

fn so_token_exists(label: &str) -> Error {
    Error::AlreadyExists(format!(
        "a System Owner token ({label}) is already initialised: there is one per installation"
    ))
}

/// What the SO token's audit record says about it (no secret): algorithm and shares.
fn so_info(row: &so_token::Model) -> pb::SoTokenInfo {
    pb::SoTokenInfo {
        label: row.label.clone(),
        algorithm: row
            .algorithm
            .parse::<KeyAlgorithm>()
            .map(|a| algorithm_to_proto(a) as i32)
            .unwrap_or(0),
        kcv: row.kcv.clone(),
        created_at: Some(audit::timestamp(row.created_at)),
        share_count: u32::try_from(row.share_count).unwrap_or(0),
        share_threshold: u32::try_from(row.share_threshold).unwrap_or(0),
        card_id: row.card_id.clone(),
    }
}

fn kcv_matches(key: &SecretKey, expected: &str) -> bool {
    let expected: String = expected.chars().filter(|c| !c.is_whitespace()).collect();
    let Ok(bytes) = (0..expected.len())
        .step_by(2)
        .map(|i| {
            expected
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(())
        })
        .collect::<Result<Vec<u8>, ()>>()
    else {
        return false;
    };
    key.verify_kcv(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cryptogram_request_loses_its_challenge_when_it_goes() {
        let mut req = ChallengeWiped(pb::ComputeCryptogramRequest {
            card_id: b"card".to_vec(),
            challenge: vec![0xA5; 16],
            challenge_code: Some(cms_proto::common::v1::TypedCode {
                hex: "A5A5 A5A5 A5A5 A5A5".into(),
                checksum: "1234".into(),
            }),
            ..Default::default()
        });
        req.wipe();
        assert!(req.challenge.is_empty());
        let code = req.challenge_code.as_ref().unwrap();
        assert!(code.hex.is_empty() && code.checksum.is_empty());
        // The card identifier is no secret, and stays.
        assert_eq!(req.card_id, b"card");
    }
}
