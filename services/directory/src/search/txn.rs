//! The transactions of the index: one writer at a time, one snapshot per search, and the WAL
//! checkpoint after an import.

use sea_orm::{
    AccessMode, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend,
    IsolationLevel, SqliteTransactionMode, TransactionOptions, TransactionTrait,
};

use super::pg;
use crate::Error;
use crate::util::Sql;

/// Begins a transaction that changes users' search documents or sort ranks: on SQLite one
/// that takes the write lock at once (two that first read, then write, would deadlock), on
/// PostgreSQL one holding the index's advisory lock, so that such writers take turns. Either
/// waits for the lock as long as SQLite's busy timeout, then fails as busy.
pub async fn write_txn(db: &DatabaseConnection) -> Result<DatabaseTransaction, Error> {
    if pg(db) {
        let txn = db.begin().await?;
        txn.execute_unprepared(LOCK_TIMEOUT).await?;
        let key = cms_kit::db::advisory_lock_key("cms-directory/search-index");
        let mut sql = Sql::new(DbBackend::Postgres);
        sql.push("SELECT pg_advisory_xact_lock(")
            .bind(key)
            .push(")");
        txn.execute_raw(sql.statement()).await?;
        Ok(txn)
    } else {
        Ok(db
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await?)
    }
}

/// After a large write (an import): on SQLite, copies the WAL into the database and truncates
/// it, so that it does not stay the size of the import until a checkpoint long after (SQLite's
/// automatic checkpoints never shrink the file). A failure is logged only: the write is done.
pub async fn checkpoint(db: &DatabaseConnection) {
    if pg(db) {
        return;
    }
    if let Err(e) = db
        .execute_unprepared("PRAGMA wal_checkpoint(TRUNCATE)")
        .await
    {
        tracing::warn!(error = %e, "WAL checkpoint after an import failed");
    }
}

/// How long a PostgreSQL writer waits for a lock (SQLite's busy timeout: `cms_kit::db`).
const LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '5s'";

/// Begins a transaction for a search: its statements see one snapshot.
pub async fn read_txn(db: &DatabaseConnection) -> Result<DatabaseTransaction, Error> {
    Ok(if pg(db) {
        db.begin_with_config(
            Some(IsolationLevel::RepeatableRead),
            Some(AccessMode::ReadOnly),
        )
        .await?
    } else {
        db.begin().await?
    })
}
