//! Giving memory back after a bulk import, so that the process returns to about its idle size.
//!
//! What an import leaves behind, measured on the real process (tests/benches/directory_import.rs):
//! the page cache (SQLite), prepared statements and grown buffers of the connections that ran
//! it (their statement caches hold the big multi-row INSERTs), and glibc's heaps: freed blocks
//! stay in the arenas (one per thread that allocated) for reuse until `malloc_trim` returns
//! them, and the few blocks still in use are scattered over the pages the import filled,
//! pinning them.

use std::time::Duration;

use sea_orm::sqlx::database::HasStatementCache;
use sea_orm::sqlx::pool::PoolConnection;
use sea_orm::sqlx::{Connection, Database, Pool};
use sea_orm::{DatabaseConnection, DbBackend};

/// Longest wait for a connection that is busy (or on its way back to the pool) when
/// releasing memory: a search holding one is not waited for longer.
const ACQUIRE_WAIT: Duration = Duration::from_millis(250);

/// Sets how the allocator serves large blocks, once at start. glibc raises its threshold for
/// serving a block from its own mapping each time such a block is freed (up to 32 MiB), so that
/// after the first big buffer an import's buffers (CSV chunks, record vectors, hash tables)
/// come from the arenas, where they fragment the heap and stay resident. A fixed threshold
/// keeps blocks of 128 KiB and more in mappings of their own, returned whole when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn tune_allocator() {
    const MMAP_THRESHOLD: libc::c_int = 128 * 1024;
    // SAFETY: mallopt takes two integers and changes glibc's own settings under its lock;
    // any thread may call it at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Other C libraries have no such adaptive threshold.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}

/// How often the heaps are trimmed while an import runs.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Trims the heaps every [`TRIM_EVERY`] until dropped: an import frees its work buffers
/// round after round on several threads, and glibc keeps each thread's freed blocks in that
/// thread's arena, where the others cannot reuse them.
pub struct Trimmer(tokio::task::JoinHandle<()>);

impl Trimmer {
    pub fn start() -> Self {
        Self(tokio::spawn(async {
            loop {
                tokio::time::sleep(TRIM_EVERY).await;
                let _ = tokio::task::spawn_blocking(trim_heap).await;
            }
        }))
    }
}

impl Drop for Trimmer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Gives back the memory an import used: each connection's cache, prepared statements and
/// buffers (the import's own connection included: it may still be on its way back to the
/// pool), then the free memory of the heaps.
pub async fn release_after_import(db: &DatabaseConnection) {
    match db.get_database_backend() {
        DbBackend::Sqlite => {
            let mut held = take_all(db.get_sqlite_connection_pool()).await;
            if let Some(kept) = held.first_mut()
                && let Err(e) = sea_orm::sqlx::query("PRAGMA shrink_memory")
                    .execute(&mut **kept)
                    .await
            {
                tracing::debug!(error = %e, "shrinking a connection's page cache failed");
            }
            keep_one(held).await;
        }
        DbBackend::Postgres => keep_one(take_all(db.get_postgres_connection_pool()).await).await,
        _ => {}
    }
    let _ = tokio::task::spawn_blocking(trim_heap).await;
}

/// Every connection of `pool`, each held until all are taken (so that none is taken twice);
/// one that stays busy longer than [`ACQUIRE_WAIT`] is left alone.
async fn take_all<DB: Database>(pool: &Pool<DB>) -> Vec<PoolConnection<DB>> {
    let mut held = Vec::new();
    while held.len() < pool.size() as usize {
        match pool.try_acquire() {
            Some(c) => held.push(c),
            None => match tokio::time::timeout(ACQUIRE_WAIT, pool.acquire()).await {
                Ok(Ok(c)) => held.push(c),
                _ => break,
            },
        }
    }
    held
}

/// Keeps the first connection of `held`, emptied of its prepared statements and with its
/// buffers shrunk, and closes the others (with all they hold): the pool opens new ones when
/// the load needs them.
async fn keep_one<DB: Database + HasStatementCache>(held: Vec<PoolConnection<DB>>) {
    let mut held = held.into_iter();
    if let Some(mut kept) = held.next() {
        if let Err(e) = kept.clear_cached_statements().await {
            tracing::debug!(error = %e, "clearing a connection's statements failed");
        }
        kept.shrink_buffers();
    }
    for connection in held {
        if let Err(e) = connection.close().await {
            tracing::debug!(error = %e, "closing a connection failed");
        }
    }
}

/// Returns the free memory at the top and in the middle of glibc's heaps to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim_heap() {
    // SAFETY: malloc_trim takes no pointers and only walks glibc's own heaps under their
    // locks; any thread may call it at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other C libraries give freed memory back on their own (or keep no arenas to trim).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}
