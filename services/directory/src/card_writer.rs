//! Card registrations go through one writer task that commits them in groups: the group's
//! owners and card ids are checked with one lookup each, its cards written with multi-row
//! INSERTs, and it is one commit (one WAL sync on SQLite) and one update of the search index.
//! Concurrent registrations so never wait on each other's database lock (where SQLite's busy
//! timeout ran out, they failed), and many in flight cost about as much as a few. The card
//! import ([`crate::card_import`]) writes its rows and search documents with the same code.
//!
//! A registration waits at most [`WAIT`] to be started, and the queue holds at most [`QUEUE`]:
//! past that it is refused as busy (UNAVAILABLE with a retry hint), never written, so a
//! client may retry it safely.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use cms_proto::directory::v1::UserStatus;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, FromQueryResult,
    SqlxSqliteConnector, Value,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::Error;
use crate::card_import::{LOOKUP_KEYS, in_json_list};
use crate::entity::{credential, user};
use crate::normalize;
use crate::search::{self, Changes};
use crate::util::Sql;

/// Rows per multi-row INSERT of cards (20 parameters each).
const INSERT_ROWS: usize = 100;
/// Users per multi-row UPDATE of search documents (3 parameters each).
const UPDATE_ROWS: usize = 300;

/// Registrations waiting for the writer, at most.
const QUEUE: usize = 8_192;
/// Registrations committed together, at most.
const MAX_GROUP: usize = 512;
/// How long a registration may wait for the writer before it is refused as busy.
pub const WAIT: Duration = Duration::from_secs(10);

/// A registration, checked except for what needs the database: the owner's state and the
/// card id's uniqueness.
pub(crate) struct NewCard {
    pub row: credential::Model,
}

struct Job {
    card: NewCard,
    deadline: Instant,
    reply: oneshot::Sender<Result<(), Error>>,
}

/// The handle of the writer task (which ends when the last handle goes).
#[derive(Clone, Debug)]
pub(crate) struct CardWriter {
    jobs: mpsc::Sender<Job>,
}

impl CardWriter {
    /// Starts the writer on `db` (on the current tokio runtime), with a connection of its own
    /// on SQLite.
    pub fn start(db: DatabaseConnection) -> Self {
        let (jobs, queue) = mpsc::channel(QUEUE);
        tokio::spawn(async move {
            match own_connection(&db).await {
                Some(own) => {
                    let (wake, commits) = mpsc::channel(1);
                    tokio::spawn(checkpoints(db, commits));
                    run(own, queue, Some(wake)).await
                }
                None => run(db, queue, None).await,
            }
        });
        Self { jobs }
    }

    /// Registers `card`: `Ok` once committed.
    pub async fn register(&self, card: NewCard) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            card,
            deadline: Instant::now() + WAIT,
            reply,
        };
        self.jobs.try_send(job).map_err(|_| {
            Error::Busy("too many card registrations are waiting; try again shortly".into())
        })?;
        answer
            .await
            .map_err(|_| Error::Busy("the card writer stopped; try again shortly".into()))?
    }
}

/// The writer's own connection to `db`'s SQLite file (none on PostgreSQL, or when one cannot
/// be opened). A connection drops its whole page cache whenever it begins a transaction after
/// another connection wrote: taking whichever pooled connection was free, each group started
/// on a cold cache (and emptying a large one costs time of its own), so a registration alone
/// took twice as long. Its commits leave the WAL to [`checkpoints`].
async fn own_connection(db: &DatabaseConnection) -> Option<DatabaseConnection> {
    if db.get_database_backend() != DbBackend::Sqlite {
        return None;
    }
    let options = (*db.get_sqlite_connection_pool().connect_options()).clone();
    if options.get_filename() == std::path::Path::new(":memory:") {
        return None; // each connection would be a database of its own
    }
    let own = sea_orm::sqlx::pool::PoolOptions::<sea_orm::sqlx::Sqlite>::new()
        .max_connections(1)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .test_before_acquire(false)
        .after_connect(|connection, _| Box::pin(cms_kit::db::stable_plans(connection)))
        .connect_with(options.pragma("wal_autocheckpoint", "0"))
        .await;
    match own {
        Ok(pool) => Some(SqlxSqliteConnector::from_sqlx_sqlite_pool(pool)),
        Err(e) => {
            tracing::warn!(error = %e, "the card writer shares the pool's connections");
            None
        }
    }
}

/// Pause between two WAL checkpoints of the card writer's commits.
const CHECKPOINT_PAUSE: Duration = Duration::from_millis(50);

/// Copies the card writer's commits from the WAL into the database file, on a pooled
/// connection, at most every [`CHECKPOINT_PAUSE`], until the writer ends. Done by the commit
/// that crossed SQLite's threshold (1,000 pages, a few groups), each such group waited for a
/// checkpoint and its sync: most of the slowest registrations. A passive checkpoint waits
/// for no one, and the writer goes on meanwhile.
async fn checkpoints(db: DatabaseConnection, mut commits: mpsc::Receiver<()>) {
    while commits.recv().await.is_some() {
        if let Err(e) = db
            .execute_unprepared("PRAGMA wal_checkpoint(PASSIVE)")
            .await
        {
            tracing::warn!(error = %e, "WAL checkpoint after card registrations failed");
        }
        tokio::time::sleep(CHECKPOINT_PAUSE).await;
    }
}

/// Commits the queued registrations group by group; after each commit, wakes `checkpoint`
/// (when the writer has a connection of its own).
async fn run(
    db: DatabaseConnection,
    mut queue: mpsc::Receiver<Job>,
    checkpoint: Option<mpsc::Sender<()>>,
) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while queue.recv_many(&mut group, MAX_GROUP).await > 0 {
        let now = Instant::now();
        let (live, late): (Vec<Job>, Vec<Job>) = group.drain(..).partition(|j| j.deadline > now);
        for job in late {
            let _ = job.reply.send(Err(Error::Busy(
                "card registrations are queued too long; try again shortly".into(),
            )));
        }
        if live.is_empty() {
            continue;
        }
        let (cards, replies): (Vec<NewCard>, Vec<_>) =
            live.into_iter().map(|j| (j.card, j.reply)).unzip();
        match commit(&db, &cards).await {
            Ok(results) => {
                if let Some(wake) = &checkpoint {
                    let _ = wake.try_send(());
                }
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                // Nothing of the group was written: each gets the same error.
                let busy = matches!(&e, Error::Storage(db) if crate::util::busy(db));
                tracing::warn!(error = %cms_kit::exit::one_line(&e), cards = cards.len(), "card registrations not committed");
                for reply in replies {
                    let _ = reply.send(Err(if busy {
                        Error::Busy("the database is busy; try again shortly".into())
                    } else {
                        Error::Internal(format!("committing card registrations: {e}"))
                    }));
                }
            }
        }
    }
}

/// Writes `cards` in one transaction: the result of each (a card refused leaves the others),
/// or the error that kept the whole group from committing. The owners and the card ids are
/// looked up for the whole group at once, the new rows written in multi-row INSERTs, and the
/// owners' search documents rebuilt together: a handful of statements per group instead of
/// several per card.
async fn commit(
    db: &DatabaseConnection,
    cards: &[NewCard],
) -> Result<Vec<Result<(), Error>>, Error> {
    let txn = search::write_txn(db).await?;
    let ids: Vec<&str> = cards.iter().map(|c| c.row.user_id.as_str()).collect();
    let owners: HashMap<String, user::Model> = users_by_id(&txn, &ids)
        .await?
        .into_iter()
        .map(|m| (m.id.clone(), m))
        .collect();
    let card_ids: Vec<&[u8]> = cards.iter().map(|c| c.row.card_id.as_slice()).collect();
    let mut taken = holders(&txn, &card_ids).await?;
    let mut results = Vec::with_capacity(cards.len());
    let mut rows = Vec::with_capacity(cards.len());
    for card in cards {
        let result = match owners.get(&card.row.user_id) {
            None => Err(Error::NotFound(format!("user {}", card.row.user_id))),
            Some(m) if m.status == UserStatus::Disabled as i32 => {
                Err(Error::FailedPrecondition(format!(
                    "user {} is disabled: no card may be registered for it",
                    card.row.user_id
                )))
            }
            Some(_) if taken.contains_key(&card.row.card_id) => Err(Error::AlreadyExists(
                "a credential with this card_id is already registered".into(),
            )),
            Some(m) => {
                taken.insert(card.row.card_id.clone(), m.id.clone());
                rows.push(card.row.clone());
                Ok(())
            }
        };
        results.push(result);
    }
    // The write lock keeps other registrations and imports out, so the card ids checked above
    // stay new. Should one be taken all the same, only that card is refused: the INSERT skips
    // it and says which it wrote (no savepoint, and no second pass card by card).
    let written = insert_new_cards(&txn, &rows).await?;
    let mut changed: HashMap<i64, &user::Model> = HashMap::new();
    for (card, result) in cards.iter().zip(results.iter_mut()) {
        if result.is_err() {
            continue;
        }
        match owners.get(&card.row.user_id) {
            Some(m) if written.contains(&card.row.card_id) => {
                changed.insert(m.num, m);
            }
            _ => {
                *result = Err(Error::AlreadyExists(
                    "a credential with this card_id is already registered".into(),
                ));
            }
        }
    }
    let mut changes = Changes::default();
    let owners: Vec<&user::Model> = changed.into_values().collect();
    refresh_documents(&txn, &owners, &mut changes).await?;
    search::apply(&txn, changes).await?;
    txn.commit().await?;
    Ok(results)
}

/// The users with the ids `ids`.
async fn users_by_id(db: &DatabaseTransaction, ids: &[&str]) -> Result<Vec<user::Model>, Error> {
    let mut out = Vec::new();
    for chunk in ids.chunks(LOOKUP_KEYS) {
        let mut sql = Sql::new(db.get_database_backend());
        sql.push("SELECT * FROM users WHERE ");
        in_json_list(&mut sql, "id", chunk)?;
        for row in db.query_all_raw(sql.statement()).await? {
            out.push(user::Model::from_query_result(&row, "")?);
        }
    }
    Ok(out)
}

/// Who holds each of the card ids `card_ids` that is registered: card id -> user id.
pub(crate) async fn holders(
    txn: &DatabaseTransaction,
    card_ids: &[&[u8]],
) -> Result<HashMap<Vec<u8>, String>, Error> {
    let mut out = HashMap::new();
    for chunk in card_ids.chunks(LOOKUP_KEYS) {
        let mut sql = Sql::new(txn.get_database_backend());
        sql.push("SELECT card_id, user_id FROM credentials WHERE card_id IN ");
        sql.tuple(true, chunk.iter().map(|id| Value::from(id.to_vec())));
        for row in txn.query_all_raw(sql.statement()).await? {
            out.insert(row.try_get("", "card_id")?, row.try_get("", "user_id")?);
        }
    }
    Ok(out)
}

/// Multi-row INSERTs of new card rows.
pub(crate) async fn insert_cards(
    txn: &DatabaseTransaction,
    rows: &[credential::Model],
) -> Result<(), Error> {
    for chunk in rows.chunks(INSERT_ROWS) {
        txn.execute_raw(insert_sql(txn.get_database_backend(), chunk).statement())
            .await?;
    }
    Ok(())
}

/// [`insert_cards`], skipping a row whose card id is taken: the card ids written.
async fn insert_new_cards(
    txn: &DatabaseTransaction,
    rows: &[credential::Model],
) -> Result<HashSet<Vec<u8>>, Error> {
    let mut written = HashSet::with_capacity(rows.len());
    for chunk in rows.chunks(INSERT_ROWS) {
        let mut sql = insert_sql(txn.get_database_backend(), chunk);
        sql.push(" ON CONFLICT DO NOTHING RETURNING card_id");
        for row in txn.query_all_raw(sql.statement()).await? {
            written.insert(row.try_get("", "card_id")?);
        }
    }
    Ok(written)
}

/// The multi-row INSERT of `rows`.
fn insert_sql(backend: DbBackend, rows: &[credential::Model]) -> Sql {
    let mut sql = Sql::new(backend);
    sql.push(
        "INSERT INTO credentials (id, user_id, card_id, serial, serial_key, atr, profile, \
         template_id, template_version, master_key_version, puk_version, \
         puk_rotation_pending, status, status_reason, issued_at, last_unblock_at, \
         last_unblock_flow, unblock_count, updated_at, label) VALUES ",
    );
    for (i, c) in rows.iter().enumerate() {
        sql.tuple(
            i == 0,
            [
                Value::from(c.id.clone()),
                c.user_id.clone().into(),
                c.card_id.clone().into(),
                c.serial.clone().into(),
                c.serial_key.clone().into(),
                c.atr.clone().into(),
                c.profile.into(),
                c.template_id.clone().into(),
                c.template_version.into(),
                c.master_key_version.into(),
                c.puk_version.into(),
                c.puk_rotation_pending.into(),
                c.status.into(),
                c.status_reason.clone().into(),
                c.issued_at.into(),
                c.last_unblock_at.into(),
                c.last_unblock_flow.into(),
                c.unblock_count.into(),
                c.updated_at.into(),
                c.label.clone().into(),
            ],
        );
    }
    sql
}

/// Owners whose documents one thread makes, at least (fewer are made on the caller's thread).
const OWNERS_PER_THREAD: usize = 256;

/// The new search and prefix documents of `owners` (`(num, doc, prefix)`) from their cards'
/// `serials`, and their posting list changes, added to `changes`. A large import batch is
/// shared among the machine's cores: this is most of its time outside the database, which
/// otherwise waited for it.
fn new_documents(
    owners: &[&user::Model],
    serials: &HashMap<String, Vec<String>>,
    changes: &mut Changes,
) -> Vec<(i64, String, String)> {
    let make = |owners: &[&user::Model]| {
        let mut changes = Changes::default();
        let mut docs = Vec::with_capacity(owners.len());
        for m in owners {
            let theirs = serials.get(&m.id).map(Vec::as_slice).unwrap_or_default();
            let doc = normalize::search_doc(&m.display_name, &m.username, &m.email, theirs);
            changes.replace((m.sort_rank, &m.search_doc), (m.sort_rank, &doc));
            docs.push((m.num, normalize::prefix_doc(&doc), doc));
        }
        (docs, changes)
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(owners.len() / OWNERS_PER_THREAD)
        .max(1);
    let parts: Vec<_> = if threads == 1 {
        vec![make(owners)]
    } else {
        let per = owners.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let mut chunks = owners.chunks(per);
            let first = chunks.next().unwrap_or_default();
            let others: Vec<_> = chunks.map(|c| scope.spawn(move || make(c))).collect();
            let mut parts = vec![make(first)];
            // A thread that panicked passes its panic on.
            parts.extend(others.into_iter().map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            }));
            parts
        })
    };
    let mut docs = Vec::with_capacity(owners.len());
    for (part, theirs) in parts {
        docs.extend(
            part.into_iter()
                .map(|(num, prefix, doc)| (num, doc, prefix)),
        );
        changes.merge(theirs);
    }
    docs
}

/// Rebuilds the search documents of `owners` (whose cards changed) from their cards' serials,
/// writes them, and records the posting list changes in `changes`.
pub(crate) async fn refresh_documents(
    txn: &DatabaseTransaction,
    owners: &[&user::Model],
    changes: &mut Changes,
) -> Result<(), Error> {
    let mut rows: Vec<(String, i64, String, String)> = Vec::new();
    let ids: Vec<&str> = owners.iter().map(|m| m.id.as_str()).collect();
    for chunk in ids.chunks(LOOKUP_KEYS) {
        let mut sql = Sql::new(txn.get_database_backend());
        // Sorted here, not by the database: no order that a plan could serve by walking the
        // whole owner index instead of looking each owner up.
        sql.push("SELECT user_id, issued_at, id, serial FROM credentials WHERE ");
        in_json_list(&mut sql, "user_id", chunk)?;
        for row in txn.query_all_raw(sql.statement()).await? {
            rows.push((
                row.try_get("", "user_id")?,
                row.try_get("", "issued_at")?,
                row.try_get("", "id")?,
                row.try_get("", "serial")?,
            ));
        }
    }
    // The order of `users::serials_of`, ties broken by id (new cards come last).
    rows.sort_unstable();
    let mut serials: HashMap<String, Vec<String>> = HashMap::new();
    for (owner, _, _, serial) in rows {
        serials.entry(owner).or_default().push(serial);
    }
    let docs = new_documents(owners, &serials, changes);
    for chunk in docs.chunks(UPDATE_ROWS) {
        let mut sql = Sql::new(txn.get_database_backend());
        sql.push("WITH v (num, doc, prefix) AS (VALUES ");
        for (i, (num, doc, prefix)) in chunk.iter().enumerate() {
            sql.tuple(
                i == 0,
                [Value::from(*num), doc.clone().into(), prefix.clone().into()],
            );
        }
        sql.push(
            ") UPDATE users SET search_doc = v.doc, prefix_doc = v.prefix FROM v \
             WHERE users.num = v.num",
        );
        txn.execute_raw(sql.statement()).await?;
    }
    Ok(())
}
