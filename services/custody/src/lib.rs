//! Key custody: the HSM-style service that turns a card's challenge into the response that
//! unblocks it, without any master or per-card key ever leaving it.
//!
//! Module map, one responsibility each:
//! * `api`: the one tonic adapter: decodes each RPC, calls its domain function, encodes.
//! * `custody`: the instance: what it holds, how it opens, whether it serves.
//! * `sealing`: GetStatus, InitSeal, Unseal, Seal: the key-encryption key in memory.
//! * `master_keys`: GenerateMasterKey, RotateMasterKey, RetireMasterKeyVersion,
//!   ListMasterKeys, and storing a new version.
//! * `key_table`: the master key versions held unwrapped while unsealed, and the one check
//!   of whether a version may be used.
//! * `key_import`: the component import ceremony (begin, add, finish, abort) and its records.
//! * `cryptogram`: ComputeCryptogram: guards, per-card budget, response, its record.
//! * `puk`: PIV PUK release; `puk::checks` (request checks), `puk::state` (per-card state),
//!   `puk::rotation` (ConfirmPukRotation, GetPukStatus).
//! * `so_token`: the System Owner token's unblock key, made once.
//! * `audit_admin`: QueryAudit, VerifyAudit, ExportAuditHead.
//! * [`audit`]: the hash-chained audit log's handle; `audit::writer` (group commit, claims
//!   decided in order), `audit::usage` (per-card limit and replay index), `audit::verify`
//!   (chain walk), `audit::columns` (the record's columns, once: hash and writers),
//!   `audit::sink` (SQLite / PostgreSQL writes), `audit::events` (a constructor per event
//!   kind), `audit::gate` (refused administrative calls on the record), `audit::query`,
//!   `audit::head_file`, `audit::wal`.
//! * [`guards`]: the verified peer, caller scopes, rate limits.
//! * `health`: gRPC health of the custody API (NOT_SERVING unless it can answer).
//! * `convert`: proto enums and hex at the domain's edge.
//! * [`store`]: tables, migrations, the states kept as strings (`store::states`).
//! * [`wrap`] (the KEK: AEAD wrapping, fingerprints), [`seal`] (Shamir shares, dev seal
//!   file), [`keystore`] (where master keys live and cryptograms are computed), `keyrules`
//!   (master key rules), [`selftest`] (known-answer tests at start), [`lease`] and `replica`
//!   (one serving instance per database: a locked SQLite file, or active/standby on
//!   PostgreSQL), `config`, [`error`].

mod api;
pub mod audit;
mod audit_admin;
mod config;
mod convert;
mod cryptogram;
mod custody;
pub mod error;
pub mod guards;
mod health;
mod key_import;
mod key_table;
mod keyrules;
pub mod keystore;
pub mod lease;
mod master_keys;
mod puk;
mod replica;
pub mod seal;
mod sealing;
pub mod selftest;
mod so_token;
mod standby_seal;
pub mod store;
pub mod wrap;

pub use config::{
    CallerScope, Config, GuardSettings, KeystoreBackend, KeystoreSettings, SealSettings,
};
pub use custody::{Custody, Options};
pub use error::Error;
pub use health::Health;

use cms_kit::ops::Readiness;
use cms_kit::server::{Listeners, Server};
use cms_kit::service::{Program, ServiceFuture};
use cms_kit::shutdown::Shutdown;
use cms_kit::tls::TlsSource;
use cms_proto::custody::v1::custody_service_server::CustodyServiceServer;
use std::sync::Arc;

use replica::Replica;

pub const NAME: &str = "custody";

/// The audit chain's head, kept in the data directory beside the database (on PostgreSQL too):
/// a tail cut off the audit table is caught at start (see `audit::HeadFile`).
pub const AUDIT_HEAD_FILE: &str = "custody-audit.head";

/// The `cms-custody` binary: serves, or only migrates (`--migrate-only`).
pub const PROGRAM: Program<Config, Error> = Program {
    name: NAME,
    run,
    migrate: Some(migrate),
};

/// Serves the custody API on `listeners` until `shutdown`.
///
/// Boxed so that the service's async code is compiled once, in this crate: a binary or test
/// that awaited the bare future would compile all of it again (minutes per binary).
pub fn run(config: Config, listeners: Listeners, shutdown: Shutdown) -> ServiceFuture<Error> {
    Box::pin(serve_custody(config, listeners, shutdown))
}

/// Applies pending migrations and returns: no keystore, no unsealing, no serving.
pub fn migrate(config: Config) -> ServiceFuture<Error> {
    Box::pin(async move {
        let db = cms_kit::db::connect(&config.database, &config.data_dir, NAME).await?;
        // Not while a serving instance uses the SQLite file (see `lease`).
        let _file_lock = match db.get_database_backend() {
            sea_orm::DbBackend::Sqlite => {
                Some(lease::FileLock::acquire(&audit::sqlite_file(&db).await?)?)
            }
            _ => None,
        };
        migrate_database(&db).await?;
        db.close().await.map_err(Error::Migrate)?;
        Ok(())
    })
}

/// Applies pending migrations, once (under an advisory lock on PostgreSQL).
async fn migrate_database(db: &sea_orm::DatabaseConnection) -> Result<(), Error> {
    cms_kit::db::migrate::<store::migration::Migrator>(db, NAME)
        .await
        .map_err(Error::Migrate)
}

async fn serve_custody(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), Error> {
    let tls = TlsSource::load(config.tls)?;
    // Custody's API is NOT_SERVING on gRPC health until custody can answer (see `health`).
    let health = tonic_health::server::HealthReporter::new();
    health
        .set_service_status(health::SERVICE, tonic_health::ServingStatus::NotServing)
        .await;
    // `soft` or `pkcs11` (`[keystore]`). Opening an HSM blocks briefly (module load, login,
    // known-answer tests on the token); nothing is being served yet.
    let keystore = keystore::open(&config.keystore)?;
    let db = cms_kit::db::connect(&config.database, &config.data_dir, NAME).await?;
    // One instance per SQLite file, checked before anything touches it (see `lease`).
    let _file_lock = match db.get_database_backend() {
        sea_orm::DbBackend::Sqlite => {
            Some(lease::FileLock::acquire(&audit::sqlite_file(&db).await?)?)
        }
        _ => None,
    };
    migrate_database(&db).await?;
    // The audit head file lives there, also when the database is PostgreSQL.
    cms_kit::db::prepare_data_dir(&config.data_dir)?;
    let options = Options {
        db: db.clone(),
        keystore,
        callers: config.callers,
        guards: config.guards,
        dev_seal_file: config.seal.dev_seal_file,
        audit_head_file: Some(config.data_dir.join(AUDIT_HEAD_FILE)),
        fence: None,
        unsealed: None,
        health: Health::new(health.clone()),
    };
    let readiness = Readiness::new("starting");
    // One serving instance per database (see `lease`).
    let (replica, follower) = match db.get_database_backend() {
        sea_orm::DbBackend::Postgres => {
            readiness.hold(replica::STANDBY);
            let replica = Arc::new(Replica::standby(options.callers.clone(), db.clone()));
            let follower = tokio::spawn(replica::follow_lease(
                lease::PgLease::new(&db),
                replica.clone(),
                options,
                readiness.clone(),
            ));
            (replica, Some(follower))
        }
        _ => {
            let replica = Arc::new(Replica::standby(options.callers.clone(), db.clone()));
            replica.activate(Custody::open(options).await?).await;
            (replica, None)
        }
    };
    let served = Server::new(NAME, config.server, config.access, tls)
        .with_readiness(readiness)
        .with_health(health)
        .reports_own_health::<CustodyServiceServer<Replica>>()
        .add_service(CustodyServiceServer::from_arc(replica))
        .serve(listeners, shutdown)
        .await;
    // Ends the lease session, so that a standby takes over now rather than when it times out.
    if let Some(follower) = follower {
        follower.abort();
        let _ = follower.await;
    }
    served?;
    Ok(())
}
