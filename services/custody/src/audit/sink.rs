//! Where the writer's batches go: one multi-row INSERT per batch on a connection of the
//! writer's own, with the statement text cached per batch size and the values bound straight
//! from the records.
//!
//! Not through the pool and the query builder: a pool round trip, a builder pass and a copy
//! of every value per record were most of the writer's cost. The connection is opened on the
//! writer's thread (its socket, on PostgreSQL, belongs to that runtime) and dropped after any
//! failure, to be opened again for the next batch.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use sea_orm::sqlx::postgres::PgConnection;
use sea_orm::sqlx::sqlite::{SqliteConnection, SqliteSynchronous};
use sea_orm::sqlx::{self, AssertSqlSafe, Connection, Database, Encode, Type};
use sea_orm::{DatabaseConnection, DbBackend, DbErr, RuntimeErr};

use crate::store::entities::audit_record;

/// `audit_record`'s columns, in the order [`bind`] binds them.
const COLUMNS: [&str; 19] = [
    "seq",
    "at",
    "event",
    "outcome",
    "caller",
    "actor_kind",
    "actor_id",
    "user_id",
    "card_id",
    "flow",
    "approval_id",
    "request_id",
    "key_reference",
    "key_version",
    "reason",
    "prev_hash",
    "hash",
    "card_fp",
    "challenge_fp",
];

/// Prepared statements kept per connection: one per batch size seen recently.
const STATEMENT_CACHE: usize = 256;

enum Conn {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

pub(super) struct Sink {
    /// Where the connect options come from.
    pool: DatabaseConnection,
    conn: Option<Conn>,
    /// INSERT text by number of rows.
    sql: HashMap<usize, Arc<str>>,
}

impl Sink {
    pub(super) fn new(pool: DatabaseConnection) -> Self {
        Self {
            pool,
            conn: None,
            sql: HashMap::new(),
        }
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
        let conn = match self.pool.get_database_backend() {
            DbBackend::Sqlite => {
                let pool = self.pool.get_sqlite_connection_pool();
                // Every commit is on disk before it returns, whatever the pool was given. The
                // WAL is checkpointed beside the writer (`checkpoints`), not inside its commits.
                let options = (*pool.connect_options())
                    .clone()
                    .synchronous(SqliteSynchronous::Full)
                    .pragma("wal_autocheckpoint", "0")
                    // The WAL file is cut back to this when a commit starts it over.
                    .pragma("journal_size_limit", "16777216")
                    .statement_cache_capacity(STATEMENT_CACHE);
                Conn::Sqlite(
                    SqliteConnection::connect_with(&options)
                        .await
                        .map_err(conn_err)?,
                )
            }
            DbBackend::Postgres => {
                let pool = self.pool.get_postgres_connection_pool();
                let options = (*pool.connect_options())
                    .clone()
                    .statement_cache_capacity(STATEMENT_CACHE);
                Conn::Postgres(
                    PgConnection::connect_with(&options)
                        .await
                        .map_err(conn_err)?,
                )
            }
            other => {
                return Err(DbErr::Custom(format!(
                    "the audit log cannot be written to {other:?}"
                )));
            }
        };
        Ok(conn)
    }

    /// Inserts `rows` as one statement: all of them, or (on error) none.
    pub(super) async fn insert(&mut self, rows: Vec<audit_record::Model>) -> Result<(), DbErr> {
        self.open().await?;
        let sql = self.sql(rows.len());
        let result = match self.conn.as_mut() {
            Some(Conn::Sqlite(conn)) => bind(sqlx::query(AssertSqlSafe(sql)), rows)
                .execute(conn)
                .await
                .map(drop),
            Some(Conn::Postgres(conn)) => bind(sqlx::query(AssertSqlSafe(sql)), rows)
                .execute(conn)
                .await
                .map(drop),
            None => unreachable!("opened above"),
        };
        if result.is_err() {
            // Whatever state the connection is in, the next batch gets a fresh one.
            self.conn = None;
        }
        result.map_err(|e| DbErr::Exec(RuntimeErr::SqlxError(Arc::new(e))))
    }

    /// `INSERT INTO audit_record (…) VALUES (…), (…)` for `rows` rows, in the backend's
    /// placeholder style; built once per size.
    fn sql(&mut self, rows: usize) -> Arc<str> {
        let postgres = self.pool.get_database_backend() == DbBackend::Postgres;
        self.sql
            .entry(rows)
            .or_insert_with(|| {
                let mut sql = format!("INSERT INTO audit_record ({}) VALUES ", COLUMNS.join(", "));
                let mut n = 0;
                for row in 0..rows {
                    sql.push_str(if row == 0 { "(" } else { ", (" });
                    for column in 0..COLUMNS.len() {
                        n += 1;
                        if column > 0 {
                            sql.push_str(", ");
                        }
                        if postgres {
                            let _ = write!(sql, "${n}");
                        } else {
                            sql.push('?');
                        }
                    }
                    sql.push(')');
                }
                sql.into()
            })
            .clone()
    }
}

/// Binds every row's values, in [`COLUMNS`] order, moving them (no copy of a string).
fn bind<DB: Database>(
    mut query: sqlx::query::Query<'static, DB, DB::Arguments>,
    rows: Vec<audit_record::Model>,
) -> sqlx::query::Query<'static, DB, DB::Arguments>
where
    for<'a> i64: Encode<'a, DB> + Type<DB>,
    for<'a> i32: Encode<'a, DB> + Type<DB>,
    for<'a> String: Encode<'a, DB> + Type<DB>,
    for<'a> Vec<u8>: Encode<'a, DB> + Type<DB>,
    for<'a> Option<Vec<u8>>: Encode<'a, DB> + Type<DB>,
{
    for r in rows {
        query = query
            .bind(r.seq)
            .bind(r.at)
            .bind(r.event)
            .bind(r.outcome)
            .bind(r.caller)
            .bind(r.actor_kind)
            .bind(r.actor_id)
            .bind(r.user_id)
            .bind(r.card_id)
            .bind(r.flow)
            .bind(r.approval_id)
            .bind(r.request_id)
            .bind(r.key_reference)
            .bind(r.key_version)
            .bind(r.reason)
            .bind(r.prev_hash)
            .bind(r.hash)
            .bind(r.card_fp)
            .bind(r.challenge_fp);
    }
    query
}

fn conn_err(e: sqlx::Error) -> DbErr {
    DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e)))
}
