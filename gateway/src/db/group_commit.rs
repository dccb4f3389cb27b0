//! Group commit for the two writes every helpdesk call makes: its rate-limit counts and its
//! decision row.
//!
//! One transaction per write made each call wait for two syncs of the database file, and the
//! database's single writer made every call wait behind every other call's syncs: the
//! gateway's throughput was one call per two syncs. Here one task writes what the calls
//! queued meanwhile in one transaction, and answers each call only after that transaction
//! committed: a counted request or a decision is never acknowledged before it is durable.
//!
//! Counts of one bucket in one batch become one `INSERT … ON CONFLICT DO UPDATE count =
//! count + n RETURNING count`, and each call gets the count it would have seen alone (in the
//! order the calls were queued). Buckets are written in sorted order, so two replicas'
//! batches on PostgreSQL lock the same rows in the same order and cannot deadlock.

use std::collections::BTreeMap;

use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ColumnTrait, DatabaseConnection, DatabaseTransaction, DbErr, EntityTrait, QueryFilter, Set,
    TransactionTrait,
};
use tokio::sync::{mpsc, oneshot};

use super::{decision, rate_window};

/// The most writes one transaction takes (a decision row binds 14 values; 128 rows stay
/// under SQLite's and PostgreSQL's limits on bound values per statement).
const MAX_BATCH: usize = 128;

/// Writes waiting for the writer; callers wait for room beyond this.
const QUEUE: usize = 4096;

/// A window of a rate-limit bucket: (bucket, window start in ms).
type Window = (String, i64);

enum Write {
    Count {
        window: Window,
        reply: oneshot::Sender<Result<i64, DbErr>>,
    },
    Decision {
        row: Box<decision::ActiveModel>,
        reply: oneshot::Sender<Result<(), DbErr>>,
    },
}

/// The queue to the writer task. Cheap to clone; the task ends when the last clone is gone.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Write>,
}

impl GroupCommit {
    /// Starts the writer task on `db` (call from within the runtime).
    pub fn start(db: DatabaseConnection) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(run(db, receiver));
        Self { queue }
    }

    /// Counts one event in the window starting at `window_start` of `bucket`; returns the
    /// window's count with this event, once it is committed.
    pub async fn count(&self, bucket: &str, window_start: i64) -> Result<i64, DbErr> {
        let (reply, answer) = oneshot::channel();
        self.send(Write::Count {
            window: (bucket.to_owned(), window_start),
            reply,
        })
        .await?;
        answer.await.map_err(|_| stopped())?
    }

    /// Appends a decision row; returns once it is committed.
    pub async fn decision(&self, row: decision::ActiveModel) -> Result<(), DbErr> {
        let (reply, answer) = oneshot::channel();
        self.send(Write::Decision {
            row: Box::new(row),
            reply,
        })
        .await?;
        answer.await.map_err(|_| stopped())?
    }

    async fn send(&self, write: Write) -> Result<(), DbErr> {
        self.queue.send(write).await.map_err(|_| stopped())
    }
}

fn stopped() -> DbErr {
    DbErr::Custom("the gateway's database writer has stopped".into())
}

async fn run(db: DatabaseConnection, mut receiver: mpsc::Receiver<Write>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
        write_batch(&db, std::mem::take(&mut batch)).await;
    }
}

/// Writes one batch in one transaction and answers its callers.
async fn write_batch(db: &DatabaseConnection, batch: Vec<Write>) {
    let mut counts = Vec::new();
    let mut rows = Vec::new();
    let mut decided = Vec::new();
    for write in batch {
        match write {
            Write::Count { window, reply } => counts.push((window, reply)),
            Write::Decision { row, reply } => {
                rows.push(*row);
                decided.push(reply);
            }
        }
    }
    let mut added: BTreeMap<&Window, i64> = BTreeMap::new();
    for (window, _) in &counts {
        *added.entry(window).or_default() += 1;
    }
    match commit(db, &added, rows).await {
        Ok(totals) => {
            // Each call's count: the window's count before this batch plus the calls queued
            // before it in this batch, plus its own.
            let mut seen: BTreeMap<Window, i64> = totals
                .into_iter()
                .map(|(window, total)| (window.clone(), total - added[window]))
                .collect();
            for (window, reply) in counts {
                let count = seen.entry(window).or_default();
                *count += 1;
                let _ = reply.send(Ok(*count));
            }
            for reply in decided {
                let _ = reply.send(Ok(()));
            }
        }
        Err(err) => {
            tracing::error!(error = %err, "cannot write to the gateway's database");
            let message = err.to_string();
            for (_, reply) in counts {
                let _ = reply.send(Err(DbErr::Custom(message.clone())));
            }
            for reply in decided {
                let _ = reply.send(Err(DbErr::Custom(message.clone())));
            }
        }
    }
}

async fn commit<'w>(
    db: &DatabaseConnection,
    added: &BTreeMap<&'w Window, i64>,
    rows: Vec<decision::ActiveModel>,
) -> Result<BTreeMap<&'w Window, i64>, DbErr> {
    let txn = db.begin().await?;
    let mut totals = BTreeMap::new();
    for (window, n) in added {
        totals.insert(*window, add(&txn, window, *n).await?);
    }
    if !rows.is_empty() {
        decision::Entity::insert_many(rows)
            .exec_without_returning(&txn)
            .await?;
    }
    txn.commit().await?;
    Ok(totals)
}

/// Adds `n` to a window's count and returns the new count; the bucket's older windows go
/// when a new one starts.
async fn add(txn: &DatabaseTransaction, (bucket, start): &Window, n: i64) -> Result<i64, DbErr> {
    let total = rate_window::Entity::insert(rate_window::ActiveModel {
        bucket: Set(bucket.clone()),
        window_start: Set(*start),
        count: Set(n),
    })
    .on_conflict(
        OnConflict::columns([
            rate_window::Column::Bucket,
            rate_window::Column::WindowStart,
        ])
        .value(
            rate_window::Column::Count,
            Expr::col((rate_window::Entity, rate_window::Column::Count)).add(n),
        )
        .to_owned(),
    )
    .exec_with_returning(txn)
    .await?
    .count;
    if total == n {
        rate_window::Entity::delete_many()
            .filter(rate_window::Column::Bucket.eq(bucket.as_str()))
            .filter(rate_window::Column::WindowStart.lt(*start))
            .exec(txn)
            .await?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use cms_kit::db::DatabaseSettings;
    use sea_orm::PaginatorTrait;

    use super::*;
    use crate::decisions::Decision;

    async fn database(dir: &std::path::Path) -> DatabaseConnection {
        let settings = DatabaseSettings {
            url: None,
            max_connections: 8,
        };
        let db = cms_kit::db::connect(&settings, dir, "gateway")
            .await
            .expect("database");
        super::super::migration::run(&db).await.expect("migrations");
        db
    }

    /// Concurrent calls share transactions, yet each sees its own count, a limit admits
    /// exactly its maximum, and every acknowledged write is in the database.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn batched_writes_count_exactly_and_are_committed_when_acknowledged() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = database(dir.path()).await;
        let writes = GroupCommit::start(db.clone());
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..300u32 {
            let writes = writes.clone();
            calls.spawn(async move {
                let bucket = if i % 3 == 0 {
                    "operator:b"
                } else {
                    "operator:a"
                };
                let count = writes.count(bucket, 1000).await.expect("count");
                Decision::default().record(&writes, Ok(())).await;
                (bucket, count)
            });
        }
        let mut seen: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
        while let Some(call) = calls.join_next().await {
            let (bucket, count) = call.expect("call");
            seen.entry(bucket).or_default().push(count);
        }
        for counts in seen.values_mut() {
            counts.sort_unstable();
        }
        assert_eq!(seen["operator:a"], (1..=200).collect::<Vec<i64>>());
        assert_eq!(seen["operator:b"], (1..=100).collect::<Vec<i64>>());
        let decisions = decision::Entity::find().count(&db).await.expect("count");
        assert_eq!(decisions, 300);

        // A limit of 10 under 50 concurrent calls: exactly 10 pass.
        let mut takes = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let writes = writes.clone();
            takes.spawn(async move {
                crate::ratelimit::take(
                    &writes,
                    "operator:c",
                    10,
                    Duration::from_secs(3600),
                    "test limit",
                )
                .await
                .is_ok()
            });
        }
        let mut passed = 0;
        while let Some(take) = takes.join_next().await {
            passed += usize::from(take.expect("take"));
        }
        assert_eq!(passed, 10);
    }

    /// A new window of a bucket removes the bucket's older windows, in the same batch.
    #[tokio::test]
    async fn a_new_window_drops_the_older_ones() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = database(dir.path()).await;
        let writes = GroupCommit::start(db.clone());
        assert_eq!(writes.count("operator:a", 1000).await.expect("count"), 1);
        assert_eq!(writes.count("operator:a", 1000).await.expect("count"), 2);
        assert_eq!(writes.count("operator:a", 2000).await.expect("count"), 1);
        let windows = rate_window::Entity::find().all(&db).await.expect("windows");
        assert_eq!(windows.len(), 1);
        assert_eq!(windows[0].window_start, 2000);
    }
}
