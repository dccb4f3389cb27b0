//! Database connections: an SQLite file in the service's data directory by default (WAL,
//! synchronous=FULL), or PostgreSQL when `database.url` is set.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sea_orm::{ConnectOptions, Database, DatabaseConnection};
use serde::Deserialize;

/// The `[database]` section of a service config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://…` for PostgreSQL; unset: `<data_dir>/<service>.sqlite3`.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

fn default_max_connections() -> u32 {
    8
}

/// Most of an SQLite file mapped into memory per connection (the mapping is shared; SQLite caps
/// it at its compile-time maximum, 2 GiB by default).
const SQLITE_MMAP_BYTES: u64 = 1 << 31;
/// Page cache of each SQLite connection, KiB (filled only as pages are used).
const SQLITE_CACHE_KIB: u32 = 65_536;

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: default_max_connections(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("data_dir {path}: {reason}")]
    DataDir { path: PathBuf, reason: String },
    #[error("database.max_connections must be at least 1")]
    NoConnections,
    #[error("database.url: cannot open {target}: {source}")]
    Connect {
        target: String,
        source: sea_orm::DbErr,
    },
}

/// Makes sure `dir` exists, is a directory and is writable (by writing and removing a probe).
pub fn prepare_data_dir(dir: &Path) -> Result<(), DbError> {
    let fail = |reason: String| DbError::DataDir {
        path: dir.to_owned(),
        reason,
    };
    if dir.exists() && !dir.is_dir() {
        return Err(fail("exists and is not a directory".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    // Unique per call: two services (or tests) may prepare the same directory at once.
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = dir.join(format!(".write-probe-{}-{n}", std::process::id()));
    std::fs::write(&probe, b"probe").map_err(|e| fail(format!("not writable: {e}")))?;
    std::fs::remove_file(&probe).map_err(|e| fail(format!("not writable: {e}")))?;
    Ok(())
}

/// Opens the service database, creating the SQLite file when needed.
pub async fn connect(
    settings: &DatabaseSettings,
    data_dir: &Path,
    service: &str,
) -> Result<DatabaseConnection, DbError> {
    if settings.max_connections == 0 {
        return Err(DbError::NoConnections);
    }
    let (url, shown) = match &settings.url {
        Some(url) => (url.clone(), redact_url(url)),
        None => {
            prepare_data_dir(data_dir)?;
            let file = data_dir.join(format!("{service}.sqlite3"));
            (
                format!("sqlite://{}?mode=rwc", file.display()),
                file.display().to_string(),
            )
        }
    };
    let mut options = ConnectOptions::new(url.clone());
    options
        .max_connections(settings.max_connections)
        .connect_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    if url.starts_with("sqlite:") {
        // A file cannot go stale like a network connection, and each ping is a round trip to
        // the connection's worker thread: that wake-up is most of a short query's time.
        options.test_before_acquire(false);
        // Reads go through a memory map of the file (one mapping per connection, all sharing
        // the OS page cache) instead of being copied into each connection's small default
        // cache (2 MiB: far less than the indexes of a large table); each connection also
        // gets a larger cache of its own for the pages it writes, and sorts stay in memory.
        options.map_sqlx_sqlite_opts(|o| {
            o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(5))
                .foreign_keys(true)
                .pragma("mmap_size", SQLITE_MMAP_BYTES.to_string())
                .pragma("cache_size", format!("-{SQLITE_CACHE_KIB}"))
                .pragma("temp_store", "memory")
        });
        options.map_sqlx_sqlite_pool_opts(|pool| {
            pool.after_connect(|connection, _| Box::pin(stable_plans(connection)))
        });
    }
    Database::connect(options)
        .await
        .map_err(|source| DbError::Connect {
            target: shown,
            source,
        })
}

/// Turns on SQLite's query planner stability guarantee for `connection` (every pooled
/// connection has it; a connection opened apart needs it too): a statement keeps
/// the plan it was prepared with whatever values are bound to it. Without it, once ANALYZE
/// has written `sqlite_stat4` (an operator's maintenance, or `PRAGMA optimize`), every
/// statement comparing a bound value with an indexed column is prepared again each time it
/// runs with other values: a fifth of a directory search's CPU, and a third of the throughput
/// of concurrent searches. Our statements are written for one plan; they need no other.
pub async fn stable_plans(
    connection: &mut sea_orm::sqlx::SqliteConnection,
) -> Result<(), sea_orm::sqlx::Error> {
    let mut handle = connection.lock_handle().await?;
    let db = handle.as_raw_handle();
    let mut enabled: std::ffi::c_int = 0;
    // SAFETY: `db` is the open connection's handle, held locked (no other thread uses it
    // meanwhile) for the length of the call; SQLITE_DBCONFIG_ENABLE_QPSG takes an int and
    // a pointer to an int it writes the new setting to, both valid here.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libsqlite3_sys::sqlite3_db_config(
            db.as_ptr(),
            libsqlite3_sys::SQLITE_DBCONFIG_ENABLE_QPSG,
            1 as std::ffi::c_int,
            &raw mut enabled,
        )
    };
    if rc != libsqlite3_sys::SQLITE_OK || enabled != 1 {
        return Err(sea_orm::sqlx::Error::Configuration(
            format!("SQLite refused the query planner stability guarantee (code {rc})").into(),
        ));
    }
    Ok(())
}

/// The URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}://{}:***@{}", &url[..scheme_end], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// A stable 64-bit key for a PostgreSQL advisory lock named `name` (FNV-1a).
pub fn advisory_lock_key(name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// Begins the transaction in which a service runs its migrations, so that they run once even
/// when several replicas start together: on PostgreSQL it first takes the transaction-scoped
/// advisory lock `cms-migrations/<service>` (the others wait, then find nothing pending; the
/// lock is released at commit or rollback); on SQLite the database file's write lock does the
/// same job. Run the migrator on the returned transaction, then commit it.
pub async fn begin_migration(
    db: &DatabaseConnection,
    service: &str,
) -> Result<sea_orm::DatabaseTransaction, sea_orm::DbErr> {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let backend = db.get_database_backend();
    let txn = db.begin().await?;
    if backend == sea_orm::DbBackend::Postgres {
        let key = advisory_lock_key(&format!("cms-migrations/{service}"));
        txn.execute_raw(sea_orm::Statement::from_sql_and_values(
            backend,
            "SELECT pg_advisory_xact_lock($1)",
            [key.into()],
        ))
        .await?;
    }
    Ok(txn)
}

/// Applies every pending migration of `M`, once: inside [`begin_migration`]'s transaction, so
/// that replicas (or migration jobs) starting together on one PostgreSQL database do not race.
pub async fn migrate<M: sea_orm_migration::MigratorTrait>(
    db: &DatabaseConnection,
    service: &str,
) -> Result<(), sea_orm::DbErr> {
    let txn = begin_migration(db, service).await?;
    M::up(&txn, None).await?;
    txn.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://cms:s3cret@127.0.0.1:5432/cms"),
            "postgres://cms:***@127.0.0.1:5432/cms"
        );
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }

    /// The plan SQLite picks for one statement with `a` and `b` bound.
    async fn plan(db: &DatabaseConnection, a: i64, b: i64) -> String {
        use sea_orm::{ConnectionTrait, Statement};
        let rows = db
            .query_all_raw(Statement::from_sql_and_values(
                sea_orm::DbBackend::Sqlite,
                "EXPLAIN QUERY PLAN SELECT * FROM t WHERE a = ? AND b = ?",
                [a.into(), b.into()],
            ))
            .await
            .unwrap();
        rows.iter()
            .map(|r| r.try_get::<String>("", "detail").unwrap())
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// With ANALYZE's samples (sqlite_stat4) SQLite plans a statement anew for the values bound
    /// to it, and prepares it again every time other values come; pooled connections keep one
    /// plan whatever the values.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_plans_do_not_follow_bound_values() {
        use sea_orm::ConnectionTrait;
        let dir = tempfile::tempdir().unwrap();
        let db = connect(&DatabaseSettings::default(), dir.path(), "plans")
            .await
            .unwrap();
        db.execute_unprepared(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, a INTEGER, b INTEGER); \
             CREATE INDEX t_a ON t (a); CREATE INDEX t_b ON t (b); \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000) \
             INSERT INTO t (a, b) SELECT CASE WHEN i % 50 = 0 THEN i ELSE 1 END, \
             CASE WHEN i % 50 = 1 THEN i ELSE 2 END FROM n; ANALYZE;",
        )
        .await
        .unwrap();
        // Rare `a` and common `b`, then the other way round: the same plan on every
        // connection of the pool.
        for _ in 0..4 {
            assert_eq!(plan(&db, 50, 2).await, plan(&db, 1, 51).await);
        }
    }

    #[test]
    fn concurrent_preparation_of_one_dir_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("shared");
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let target = target.clone();
                std::thread::spawn(move || prepare_data_dir(&target))
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    }

    #[test]
    fn data_dir_that_is_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let err = prepare_data_dir(&file).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
    }
}
