//! The custody instance: what it holds (seal state, unwrapped master keys, audit log, guards)
//! and how it opens. What each RPC does with it lives in the modules named after the concern
//! (`sealing`, `master_keys`, `key_import`, `cryptogram`, `puk`, `so_token`, `audit_admin`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use cms_proto::common::v1::AuthContext;
use sea_orm::{ActiveModelTrait, DatabaseConnection, EntityTrait, Set};
use tokio::sync::Semaphore;

use crate::audit::{self, AuditLog, Event};
use crate::config::{CallerScope, GuardSettings};
use crate::error::Error;
use crate::guards::{self, Caller, Peer, RateLimiter};
use crate::health::Health;
use crate::key_import::Import;
use crate::key_table::KeyTable;
use crate::keystore::Keystore;
use crate::seal;
use crate::sealing::Seal;
use crate::store::entities::seal_meta;
use crate::store::states::SealMode;
use crate::wrap::Kek;

pub(crate) const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What custody holds in memory, under one lock: sealing forgets the keys with the KEK.
pub(crate) struct State {
    pub(crate) seal: Seal,
    pub(crate) keys: KeyTable,
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
    pub(crate) self_test: Result<(), String>,
    pub(crate) self_test_at: i64,
    state: RwLock<State>,
    pub(crate) imports: Mutex<HashMap<String, Import>>,
    health: Health,
    /// Set when this instance's replica stands by: it serves nothing from then on.
    stood_down: AtomicBool,
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
    /// Where custody reports whether its API serves (gRPC health).
    pub health: Health,
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
        let seal = open_seal(
            &options.db,
            options.dev_seal_file.as_deref(),
            options.unsealed,
        )
        .await?;
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
                keys: KeyTable::default(),
            }),
            imports: Mutex::new(HashMap::new()),
            health: options.health,
            stood_down: AtomicBool::new(false),
        };
        custody.reload_keys().await?;
        // A chain that does not verify gets nothing appended: custody serves reads only.
        if custody.audit.broken().is_none() {
            let self_test = Event::self_test(&custody.self_test, crate::selftest::TESTS);
            custody.audit.record(self_test, None).await?;
            let records = custody.audit.head().await?.sequence;
            let backend = crate::config::KeystoreBackend::of(custody.keystore.backend());
            let started = Event::startup(VERSION, backend.as_str(), &custody.self_test, records);
            custody.audit.record(started, None).await?;
        }
        Ok(custody)
    }

    pub(crate) fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The verified caller and its scope here, or why it has none.
    pub(crate) fn caller(&self, peer: &Peer) -> Result<Caller<'_>, Error> {
        guards::caller(&self.callers, peer)
    }

    /// The key-encryption key while unsealed.
    pub(crate) fn unsealed_kek(&self) -> Option<Arc<Kek>> {
        match &self.read().seal {
            Seal::Unsealed { kek } => Some(kek.clone()),
            _ => None,
        }
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

    /// Whether custody answers cryptograms now: self-tests passed, audit chain whole,
    /// unsealed, and its replica active.
    pub(crate) fn serving(&self) -> bool {
        !self.stood_down.load(Ordering::SeqCst) && self.kek().is_ok()
    }

    /// Tells gRPC health whether custody serves, after its state changed.
    pub(crate) async fn report_health(&self) {
        self.health.publish(|| self.serving()).await;
    }

    /// Its replica stands by: custody serves nothing more, and health says so.
    pub(crate) async fn stand_down(&self) {
        self.stood_down.store(true, Ordering::SeqCst);
        self.report_health().await;
    }
}

/// The seal state custody starts in: none yet, unsealed by the dev seal file (written down
/// on first use), unsealed before in this process (a lease lost and taken again), or sealed.
async fn open_seal(
    db: &DatabaseConnection,
    dev_seal_file: Option<&std::path::Path>,
    unsealed: Option<Arc<Kek>>,
) -> Result<Seal, Error> {
    let meta = seal_meta::Entity::find_by_id(1).one(db).await?;
    Ok(match (meta, dev_seal_file) {
        (None, None) => Seal::Uninitialised,
        (None, Some(path)) => {
            let (kek, _) = seal::dev_file(path)?;
            seal_meta::ActiveModel {
                id: Set(1),
                threshold: Set(1),
                share_count: Set(1),
                kek_check: Set(kek.check_value()),
                mode: Set(SealMode::DevFile),
                created_at: Set(audit::now_ms()),
            }
            .insert(db)
            .await?;
            tracing::warn!(path = %path.display(), "development seal file in use: not for production");
            Seal::Unsealed { kek: Arc::new(kek) }
        }
        (Some(meta), Some(path)) if meta.mode == SealMode::DevFile => {
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
        (Some(meta), _) => match unsealed {
            Some(kek) if kek.check_value() == meta.kek_check => Seal::Unsealed { kek },
            _ => Seal::sealed(&meta),
        },
    })
}
