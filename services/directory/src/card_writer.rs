//! Card registrations go through one writer task that commits them in groups: each waiting
//! registration is one savepoint of the group's transaction, and the group is one commit (one
//! WAL sync on SQLite) and one update of the search index. Concurrent registrations so never
//! wait on each other's database lock (where SQLite's busy timeout ran out, they failed), and
//! many in flight cost about as much as a few.
//!
//! A registration waits at most [`WAIT`] to be started, and the queue holds at most [`QUEUE`]:
//! past that it is refused as busy (UNAVAILABLE with a retry hint), never written, so a
//! client may retry it safely.

use std::collections::HashSet;
use std::time::Duration;

use sea_orm::{DatabaseConnection, TransactionTrait};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::Error;
use crate::entity::credential;
use crate::search_index::{self, Changes};

/// Registrations waiting for the writer, at most.
const QUEUE: usize = 8_192;
/// Registrations committed together, at most.
const MAX_GROUP: usize = 512;
/// How long a registration may wait for the writer before it is refused as busy.
pub const WAIT: Duration = Duration::from_secs(10);

/// A registration, checked except for what needs the database: the owner's state and the
/// card id's uniqueness.
pub(crate) struct NewCard {
    pub row: credential::ActiveModel,
    pub user_id: String,
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
    /// Starts the writer on `db` (on the current tokio runtime).
    pub fn start(db: DatabaseConnection) -> Self {
        let (jobs, queue) = mpsc::channel(QUEUE);
        tokio::spawn(run(db, queue));
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

async fn run(db: DatabaseConnection, mut queue: mpsc::Receiver<Job>) {
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

/// Writes `cards` in one transaction, each in a savepoint of its own: the result of each (a
/// card refused leaves the others), or the error that kept the whole group from committing.
async fn commit(
    db: &DatabaseConnection,
    cards: &[NewCard],
) -> Result<Vec<Result<(), Error>>, Error> {
    let txn = search_index::write_txn(db).await?;
    let mut changes = Changes::default();
    let mut owners: HashSet<&str> = HashSet::new();
    let mut results = Vec::with_capacity(cards.len());
    for card in cards {
        if !owners.insert(&card.user_id) {
            // A second card of an owner: its document is read back, so index the first.
            search_index::apply(&txn, std::mem::take(&mut changes)).await?;
            owners.clear();
            owners.insert(&card.user_id);
        }
        let savepoint = txn.begin().await?;
        let mut own = Changes::default();
        match crate::Directory::register_in(&savepoint, card, &mut own).await {
            Ok(()) => {
                savepoint.commit().await?;
                changes.merge(own);
                results.push(Ok(()));
            }
            Err(e @ Error::Storage(_)) => return Err(e),
            Err(e) => {
                savepoint.rollback().await?;
                results.push(Err(e));
            }
        }
    }
    search_index::apply(&txn, changes).await?;
    txn.commit().await?;
    Ok(results)
}
