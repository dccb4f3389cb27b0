//! Where the writer's batches go: a connection of the writer's own, outside the pool.
//!
//! On SQLite that is a plain SQLite connection used on the writer's thread: each batch is one
//! transaction of a cached single-row INSERT, bound straight from the records. Through sqlx,
//! every batch crossed to the connection's worker thread and back, and every value was copied
//! into an argument buffer first; that was most of the writer's cost. On PostgreSQL it is one
//! sqlx connection and one multi-row INSERT per batch, its text cached per batch size. The
//! connection is dropped after any failure, to be opened again for the next batch.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sea_orm::sqlx::postgres::PgConnection;
use sea_orm::sqlx::{self, AssertSqlSafe, Connection};
use sea_orm::{DatabaseConnection, DbBackend, DbErr, RuntimeErr};

use super::columns::{self, COLUMNS, Owned};
use crate::lease::Fence;
use crate::store::entities::audit_record;

/// Prepared statements kept per PostgreSQL connection: one per batch size seen recently.
const STATEMENT_CACHE: usize = 256;

/// How long an SQLite statement waits for a lock another connection holds (a checkpoint).
const SQLITE_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

enum Conn {
    Sqlite(SqliteWriter),
    Postgres(PgConnection),
}

/// The writer's SQLite connection, and the WAL file it appends to.
///
/// Commits do not sync (`synchronous=NORMAL`); after each one the writer syncs the WAL
/// itself, with fdatasync. It is as durable: the commit's frames were written to the WAL
/// before it returned, and the sync that follows puts them on disk before anyone is answered.
/// SQLite's own sync at commit (without HAVE_FDATASYNC, which its bundled build lacks) is an
/// fsync, which on every commit also writes the WAL file's inode, for its modification time.
struct SqliteWriter {
    conn: rusqlite::Connection,
    wal_path: PathBuf,
    /// Opened after the first commit, which creates the WAL file when there is none.
    wal: Option<std::fs::File>,
}

pub(super) struct Sink {
    /// Where the connect options come from.
    pool: DatabaseConnection,
    /// The audit database's file, on SQLite.
    sqlite_file: Option<PathBuf>,
    conn: Option<Conn>,
    /// PostgreSQL INSERT text by number of rows.
    sql: HashMap<usize, Arc<str>>,
    /// On PostgreSQL with replicas: rows are appended only while this lease is held.
    fence: Option<Fence>,
}

impl Sink {
    pub(super) fn new(
        pool: DatabaseConnection,
        sqlite_file: Option<PathBuf>,
        fence: Option<Fence>,
    ) -> Self {
        Self {
            pool,
            sqlite_file,
            conn: None,
            sql: HashMap::new(),
            fence,
        }
    }

    /// The pool the writer's connection was made like, for reads.
    pub(super) fn pool(&self) -> &DatabaseConnection {
        &self.pool
    }

    /// Opens the writer's connection now, so that a database custody cannot write to stops
    /// it at start rather than at its first request.
    pub(super) async fn open(&mut self) -> Result<(), DbErr> {
        if self.conn.is_none() {
            self.conn = Some(self.connect().await?);
        }
        Ok(())
    }

    async fn connect(&self) -> Result<Conn, DbErr> {
        match (self.pool.get_database_backend(), &self.sqlite_file) {
            (DbBackend::Sqlite, Some(file)) => {
                let conn = open_sqlite(file).map_err(sqlite_conn_err)?;
                // The WAL is synced after each commit by the writer (see `SqliteWriter`), and
                // checkpointed beside it (`wal`), not inside its commits.
                let mode: String = conn
                    .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
                    .map_err(sqlite_conn_err)?;
                if !mode.eq_ignore_ascii_case("wal") {
                    return Err(DbErr::Custom(format!(
                        "the audit database is in journal mode {mode}, not WAL"
                    )));
                }
                conn.pragma_update(None, "synchronous", "NORMAL")
                    .and_then(|()| conn.pragma_update(None, "wal_autocheckpoint", 0))
                    // The WAL file is cut back to this when a commit starts it over.
                    .and_then(|()| conn.pragma_update(None, "journal_size_limit", 16_777_216))
                    .map_err(sqlite_conn_err)?;
                let mut wal_path = file.clone().into_os_string();
                wal_path.push("-wal");
                Ok(Conn::Sqlite(SqliteWriter {
                    conn,
                    wal_path: wal_path.into(),
                    wal: None,
                }))
            }
            (DbBackend::Postgres, _) => {
                let pool = self.pool.get_postgres_connection_pool();
                let options = (*pool.connect_options())
                    .clone()
                    .statement_cache_capacity(STATEMENT_CACHE);
                PgConnection::connect_with(&options)
                    .await
                    .map(Conn::Postgres)
                    .map_err(|e| DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e))))
            }
            (other, _) => Err(DbErr::Custom(format!(
                "the audit log cannot be written to {other:?}"
            ))),
        }
    }

    /// Inserts `rows` in one transaction: all of them, or (on error) none.
    pub(super) async fn insert(&mut self, rows: Vec<audit_record::Model>) -> Result<(), DbErr> {
        self.open().await?;
        let result = match self.conn.as_mut() {
            Some(Conn::Sqlite(writer)) => writer.insert(&rows),
            Some(Conn::Postgres(conn)) => {
                let count = rows.len();
                let sql = postgres_sql(&mut self.sql, count, self.fence.as_ref());
                bind(sqlx::query(AssertSqlSafe(sql)), rows)
                    .execute(conn)
                    .await
                    .map_err(|e| DbErr::Exec(RuntimeErr::SqlxError(Arc::new(e))))
                    .and_then(|done| {
                        if done.rows_affected() == count as u64 {
                            Ok(())
                        } else {
                            Err(DbErr::Custom(
                                "the custody lease is no longer held: nothing recorded".into(),
                            ))
                        }
                    })
            }
            None => unreachable!("opened above"),
        };
        if result.is_err() {
            // Whatever state the connection is in, the next batch gets a fresh one.
            self.conn = None;
        }
        result
    }
}

/// `INSERT INTO audit_record (…) VALUES ($1, …), (…)` for `rows` rows, from `cache` (built
/// once per size); with a `fence`, `INSERT … SELECT * FROM (VALUES …) WHERE <lease held>`.
fn postgres_sql(
    cache: &mut HashMap<usize, Arc<str>>,
    rows: usize,
    fence: Option<&Fence>,
) -> Arc<str> {
    cache
        .entry(rows)
        .or_insert_with(|| {
            let columns = columns::names();
            let mut sql = match fence {
                Some(_) => format!("INSERT INTO audit_record ({columns}) SELECT * FROM (VALUES "),
                None => format!("INSERT INTO audit_record ({columns}) VALUES "),
            };
            let mut n = 0;
            for row in 0..rows {
                sql.push_str(if row == 0 { "(" } else { ", (" });
                for column in 0..COLUMNS.len() {
                    n += 1;
                    if column > 0 {
                        sql.push_str(", ");
                    }
                    let _ = write!(sql, "${n}");
                }
                sql.push(')');
            }
            if let Some(fence) = fence {
                let _ = write!(
                    sql,
                    ") AS batch ({columns}) WHERE {}",
                    fence.sql_condition()
                );
            }
            sql.into()
        })
        .clone()
}

/// The file of the pool's SQLite database, as SQLite names it. An in-memory database is
/// refused: it would not keep the audit log past the process.
pub(crate) async fn sqlite_file(pool: &DatabaseConnection) -> Result<PathBuf, DbErr> {
    use sea_orm::ConnectionTrait;
    let main = pool
        .query_all_raw(sea_orm::Statement::from_string(
            DbBackend::Sqlite,
            "PRAGMA database_list",
        ))
        .await?
        .into_iter()
        .find(|row| {
            row.try_get_by_index::<String>(1)
                .is_ok_and(|name| name == "main")
        });
    match main.map(|row| row.try_get_by_index::<String>(2)).transpose()? {
        Some(file) if !file.is_empty() => Ok(PathBuf::from(file)),
        _ => Err(DbErr::Custom(
            "the audit log needs an SQLite file or PostgreSQL: an in-memory database does not keep it"
                .into(),
        )),
    }
}

/// A connection of its own to the audit database `file`, waiting for locks as the pool does.
pub(super) fn open_sqlite(file: &Path) -> rusqlite::Result<rusqlite::Connection> {
    use rusqlite::OpenFlags;
    let conn = rusqlite::Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
    Ok(conn)
}

impl SqliteWriter {
    /// Commits `rows`, then syncs the WAL.
    fn insert(&mut self, rows: &[audit_record::Model]) -> Result<(), DbErr> {
        let exec = |e: rusqlite::Error| DbErr::Exec(RuntimeErr::Internal(e.to_string()));
        insert_rows(&mut self.conn, rows).map_err(exec)?;
        if self.wal.is_none() {
            self.wal = Some(std::fs::File::open(&self.wal_path).map_err(wal_err)?);
        }
        if let Some(wal) = &self.wal {
            wal.sync_data().map_err(wal_err)?;
        }
        Ok(())
    }
}

fn wal_err(e: std::io::Error) -> DbErr {
    DbErr::Exec(RuntimeErr::Internal(format!("audit WAL: {e}")))
}

fn insert_rows(
    conn: &mut rusqlite::Connection,
    rows: &[audit_record::Model],
) -> rusqlite::Result<()> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let placeholders: Vec<String> = (1..=COLUMNS.len()).map(|n| format!("?{n}")).collect();
        format!(
            "INSERT INTO audit_record ({}) VALUES ({})",
            columns::names(),
            placeholders.join(", ")
        )
    });
    // Each statement prepared once per connection (rusqlite's own transaction would parse
    // BEGIN and COMMIT again on every batch). On an error the connection is dropped, and with
    // it the open transaction.
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    {
        let mut insert = conn.prepare_cached(&SQL)?;
        for r in rows {
            insert.execute(rusqlite::params_from_iter(
                COLUMNS.iter().map(|column| (column.get)(r)),
            ))?;
        }
    }
    conn.prepare_cached("COMMIT")?.execute([]).map(drop)
}

/// Binds every row's values, in [`COLUMNS`] order, moving them (no copy of a string).
fn bind(
    mut query: sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments>,
    rows: Vec<audit_record::Model>,
) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    for mut r in rows {
        for column in &COLUMNS {
            query = match (column.take)(&mut r) {
                Owned::I64(v) => query.bind(v),
                Owned::I32(v) => query.bind(v),
                Owned::Text(v) => query.bind(v),
                Owned::Bytes(v) => query.bind(v),
                Owned::MaybeBytes(v) => query.bind(v),
            };
        }
    }
    query
}

fn sqlite_conn_err(e: rusqlite::Error) -> DbErr {
    DbErr::Conn(RuntimeErr::Internal(e.to_string()))
}
