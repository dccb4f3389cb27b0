//! Who may serve: one custody instance per database at a time.
//!
//! Two instances that both served one database would each keep their own chain head, usage
//! and key state in memory: their audit writes collide, and one keeps answering from key
//! state the other changed (a master key retired on one was still used by the other). So:
//! - on SQLite, a second instance on the same database file refuses to start: the first holds
//!   an exclusive lock on `<database file>.lock` for the life of its process ([`FileLock`]);
//! - on PostgreSQL, instances run active/standby ([`PgLease`]): the active one holds a
//!   session-level advisory lock on a connection of its own, kept for the process's life and
//!   checked every [`POLL`]. The lock lives exactly as long as that session: when the process
//!   dies, or its connection breaks, PostgreSQL releases it and a standby takes it.

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection};
use sea_orm::sqlx::{self, Connection};
use sea_orm::{DatabaseConnection, DbErr, RuntimeErr};

use crate::error::Error;

/// How often the active instance checks its lease, and a standby tries to take it.
pub const POLL: Duration = Duration::from_millis(500);

/// Longest wait for one lease query: a connection that does not answer in time is lost.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// PostgreSQL ends the lease session when its holder sends nothing for this long (a frozen
/// process, a cut network), so that a standby can take over; the holder speaks every [`POLL`].
const IDLE_SESSION_TIMEOUT: &str = "SET idle_session_timeout = '5s'";

/// The advisory lock's name (hashed to its 64-bit key).
const LEASE_NAME: &str = "cms-custody/lease";

/// An exclusive lock on the file beside a SQLite database, held while this value lives.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
    path: PathBuf,
}

impl FileLock {
    /// Locks `<database>.lock`, or refuses when another process holds it.
    pub fn acquire(database: &Path) -> Result<Self, Error> {
        let mut path = database.as_os_str().to_owned();
        path.push(".lock");
        let path = PathBuf::from(path);
        let shown = path.display().to_string();
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| Error::LockFile {
                path: shown.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file, path }),
            Err(TryLockError::WouldBlock) => Err(Error::DatabaseInUse { path: shown }),
            Err(TryLockError::Error(source)) => Err(Error::LockFile {
                path: shown,
                source,
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The PostgreSQL lease: a session-level advisory lock on a connection of its own.
pub struct PgLease {
    options: Arc<PgConnectOptions>,
    key: i64,
    /// The lease session: open while this instance holds the lease or tries to take it.
    conn: Option<PgConnection>,
    /// The lease session's server process, while the lease is held.
    held: Option<i32>,
}

/// What the audit writer checks in the statement that appends each batch: that the lease
/// session it was opened under still holds the lease. An instance that lost its lease (and has
/// not noticed yet) then appends nothing, while a standby may already be writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence {
    backend_pid: i32,
    key: i64,
}

impl Fence {
    /// An SQL condition, true while the lease is held. Only integers are put in it.
    pub fn sql_condition(&self) -> String {
        // pg_locks shows a bigint advisory key as its high and low 32 bits, objsubid 1.
        let key = u64::from_ne_bytes(self.key.to_ne_bytes());
        format!(
            "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = {} AND classid = {} AND objid = {} AND objsubid = 1)",
            self.backend_pid,
            key >> 32,
            key & 0xFFFF_FFFF
        )
    }
}

impl PgLease {
    /// A lease on the database `db` connects to (not taken yet).
    pub fn new(db: &DatabaseConnection) -> Self {
        Self {
            options: db.get_postgres_connection_pool().connect_options(),
            key: cms_kit::db::advisory_lock_key(LEASE_NAME),
            conn: None,
            held: None,
        }
    }

    /// The fence of the lease held now, for the audit writer.
    pub fn fence(&self) -> Option<Fence> {
        self.held.map(|backend_pid| Fence {
            backend_pid,
            key: self.key,
        })
    }

    /// Takes the lease if nobody holds it; `Ok(false)` when another instance does.
    pub async fn try_take(&mut self) -> Result<bool, DbErr> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => {
                let mut conn = timed(PgConnection::connect_with(&self.options)).await?;
                // PostgreSQL before 14 has no such setting: the lease then lasts until the
                // server notices the connection is gone (TCP keepalive), which is slower.
                if let Err(e) = timed(sqlx::query(IDLE_SESSION_TIMEOUT).execute(&mut conn)).await {
                    tracing::warn!(error = %e, "idle_session_timeout not set on the custody lease session");
                }
                self.conn.insert(conn)
            }
        };
        let taken = timed(
            sqlx::query_as::<_, (bool, i32)>("SELECT pg_try_advisory_lock($1), pg_backend_pid()")
                .bind(self.key)
                .fetch_one(conn),
        )
        .await;
        match taken {
            Ok((taken, backend_pid)) => {
                self.held = taken.then_some(backend_pid);
                Ok(taken)
            }
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    /// Whether the lease is still held: its session still answers. A session-level advisory
    /// lock ends only with an explicit unlock (never done) or with its session, so a session
    /// that answers still holds it. A failure drops the session, and the lease with it.
    pub async fn still_held(&mut self) -> bool {
        let Some(conn) = self.conn.as_mut().filter(|_| self.held.is_some()) else {
            return false;
        };
        let alive = timed(sqlx::query("SELECT 1").execute(conn)).await.is_ok();
        if !alive {
            self.give_up();
        }
        alive
    }

    /// Drops the lease session (PostgreSQL releases the lock when it notices).
    pub fn give_up(&mut self) {
        self.conn = None;
        self.held = None;
    }
}

/// `query`, or an error when it takes longer than [`QUERY_TIMEOUT`].
async fn timed<T>(query: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, DbErr> {
    match tokio::time::timeout(QUERY_TIMEOUT, query).await {
        Ok(result) => result.map_err(|e| DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e)))),
        Err(_) => Err(DbErr::Custom(format!(
            "no answer from the database within {} s",
            QUERY_TIMEOUT.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_names_the_key_as_pg_locks_shows_it() {
        let fence = Fence {
            backend_pid: 4242,
            key: -2,
        };
        assert_eq!(
            fence.sql_condition(),
            "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = 4242 AND classid = 4294967295 AND objid = 4294967294 AND objsubid = 1)"
        );
    }

    #[test]
    fn a_second_lock_on_one_database_is_refused_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("custody.sqlite3");
        let first = FileLock::acquire(&database).unwrap();
        let second = FileLock::acquire(&database).unwrap_err();
        let message = second.to_string();
        assert!(matches!(second, Error::DatabaseInUse { .. }), "{second:?}");
        assert!(
            message.contains(&first.path().display().to_string()),
            "{message}"
        );
        drop(first);
        FileLock::acquire(&database).unwrap();
    }
}
