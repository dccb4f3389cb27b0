//! The SQLite WAL of the audit log, kept beside the writer: checkpoints on a thread of their
//! own, so a checkpoint's copy and fsync of the database file never sit inside a commit that
//! requests wait for (the writer's connection does not checkpoint: `wal_autocheckpoint=0`).

use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// How often the WAL is copied back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// WAL pages (4 KiB each) past which a checkpoint also makes the next commit start the WAL
/// over: 16 MiB.
pub(super) const WAL_RESTART_PAGES: i64 = 4_096;

/// Stops the checkpoint thread when dropped.
#[derive(Debug)]
pub(super) struct Checkpoints {
    _stop: mpsc::Sender<()>,
}

/// Starts checkpointing the WAL of the audit database `file` every [`CHECKPOINT_EVERY`],
/// until the returned guard is dropped.
///
/// PASSIVE checkpoints never block the writer, and copy what they can. Under steady load the
/// writer appends while each one runs, so the WAL is never all copied when the next commit
/// starts, and SQLite only ever appends to it: it grew by megabytes a second. Past
/// `restart_pages`, a RESTART checkpoint waits for the writer's commit in progress, copies
/// the little the PASSIVE one left, and makes the next commit write the WAL from its start
/// again (`journal_size_limit` then trims the file).
pub(super) fn start(file: PathBuf, restart_pages: i64) -> std::io::Result<Checkpoints> {
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("custody-checkpoint".into())
        .spawn(move || {
            let mut conn = None;
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY) {
                if conn.is_none() {
                    conn = super::sink::open_sqlite(&file)
                        .inspect_err(|e| {
                            tracing::warn!(error = %e, "audit log: cannot open the database to checkpoint its WAL; retrying");
                        })
                        .ok();
                }
                if let Some(c) = &conn
                    && let Err(e) = checkpoint(c, restart_pages)
                {
                    tracing::warn!(error = %e, "audit log: WAL checkpoint failed; retrying");
                    conn = None;
                }
            }
        })?;
    Ok(Checkpoints { _stop: stop })
}

/// One PASSIVE checkpoint, and a RESTART one when the WAL still holds over `restart_pages`.
fn checkpoint(conn: &rusqlite::Connection, restart_pages: i64) -> rusqlite::Result<()> {
    let in_wal: i64 = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| row.get(1))?;
    if in_wal > restart_pages {
        conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use cms_proto::custody::v1::{AuditEvent, AuditOutcome};

    use super::*;
    use crate::audit::{AuditLog, Event};

    /// The WAL header's checkpoint sequence number: SQLite counts up each time a commit starts
    /// the WAL over, which it does only once a checkpoint has copied all of it.
    fn wal_restarts(db_file: &std::path::Path) -> u32 {
        let mut wal = db_file.as_os_str().to_owned();
        wal.push("-wal");
        let header = std::fs::read(PathBuf::from(wal)).unwrap();
        u32::from_be_bytes(header[12..16].try_into().unwrap())
    }

    #[tokio::test]
    async fn the_wal_is_checkpointed_beside_the_writer_and_starts_over() {
        let db = crate::store::test_database().await;
        let file = crate::audit::sink::sqlite_file(&db).await.unwrap();
        let log = AuditLog::start(db.clone(), 86_400_000, None).await.unwrap();
        let record = || async {
            log.record(
                Event::new(AuditEvent::Cryptogram, AuditOutcome::Success, "c"),
                None,
            )
            .await
            .unwrap()
        };
        for _ in 0..20 {
            record().await;
        }
        let before = wal_restarts(&file);
        // The writer never checkpoints; the checkpoint thread does, every CHECKPOINT_EVERY.
        // Once it has, the next commit writes the WAL from its start again.
        let deadline = std::time::Instant::now() + 10 * CHECKPOINT_EVERY;
        while wal_restarts(&file) == before {
            assert!(
                std::time::Instant::now() < deadline,
                "the WAL was never started over: no checkpoint ran"
            );
            tokio::time::sleep(CHECKPOINT_EVERY / 5).await;
            record().await;
        }
    }
}
