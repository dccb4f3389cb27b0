//! The audit log: every cryptogram, refusal and key-lifecycle event is one record of a
//! SHA-256 hash chain, committed durably before custody answers.
//!
//! One writer task, on a thread of its own, owns the chain head. Requests queue to it; it takes
//! whatever is waiting (group commit: one transaction and one sync for the batch: on SQLite an
//! fdatasync of the WAL, see `sink`), and answers each only once the batch is on disk.
//! Per-card limits and replay refusal are decided by the writer for the whole batch, in order,
//! so they hold under any concurrency. If the commit fails nobody gets an answer but an
//! error: custody fails closed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use cms_proto::common::v1::AuthContext;
use cms_proto::custody::v1::{AuditEvent, AuditHead, AuditOutcome, AuditRecord};
use sea_orm::{DatabaseConnection, EntityTrait, QueryOrder};
use tokio::sync::{mpsc, oneshot};

use crate::store::entities::audit_record;
use crate::wrap::Fingerprint;

mod columns;
pub mod events;
pub mod gate;
mod head_file;
mod query;
mod sink;
mod usage;
mod verify;
mod wal;
mod writer;
pub use columns::record_hash;
pub use head_file::HeadFile;
use head_file::HeadKeeper;
pub use query::{AuditPage, AuditQuery};
use sink::Sink;
pub(crate) use sink::sqlite_file;
use verify::walk;
pub use verify::{ChainFault, Fault, Verdict};
use writer::{Job, State, writer};

pub const CHAIN_ID: &str = "cms-custody-audit-v1";
const GENESIS: [u8; 32] = [0; 32];
const MAX_BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("the audit log cannot be written")]
    Unavailable(#[source] sea_orm::DbErr),
    #[error("the audit writer has stopped")]
    Stopped,
    #[error("the audit writer cannot start: {0}")]
    Thread(#[source] std::io::Error),
    #[error("audit log: {0}")]
    Read(#[source] sea_orm::DbErr),
    /// The chain did not verify at start: nothing is appended to it.
    #[error("the audit chain does not verify, so nothing is recorded: {0}")]
    Broken(Arc<str>),
    #[error("audit head file: {0}")]
    HeadFile(#[from] head_file::HeadFileError),
}

/// What happened, with no secret in it. Built only by the typed constructors in [`events`]
/// (its fields are private to the audit module).
#[derive(Clone, Debug, Default)]
pub struct Event {
    event: i32,
    outcome: i32,
    caller: String,
    context: AuthContext,
    key_reference: String,
    key_version: u32,
    reason: String,
    /// Event-specific non-secret detail ("component" = "2 of 3").
    attributes: BTreeMap<&'static str, String>,
}

impl Event {
    fn new(event: AuditEvent, outcome: AuditOutcome, caller: &str) -> Self {
        Self {
            event: event as i32,
            outcome: outcome as i32,
            caller: caller.to_owned(),
            ..Default::default()
        }
    }

    /// Adds one attribute.
    fn with(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.attributes.insert(key, value.into());
        self
    }
}

/// A cryptogram's claim on the card's budget: granted, or refused as over the limit or a
/// replay. Fingerprints are keyed (KEK) hashes, never the card's challenge itself.
#[derive(Clone, Debug)]
pub struct UsageClaim {
    pub card_fp: Fingerprint,
    pub challenge_fp: Fingerprint,
    pub limit: u32,
    pub window_ms: i64,
    pub replay_window_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    CardLimit,
    Replay,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    Recorded { seq: u64 },
    Refused { seq: u64, refusal: Refusal },
}

#[derive(Clone, Debug)]
pub struct AuditLog {
    jobs: mpsc::Sender<Job>,
    db: DatabaseConnection,
    /// Why the chain did not verify at start; then every record is refused.
    broken: Option<Arc<str>>,
    /// Checkpoints of the SQLite WAL, while any handle to the log is left.
    _checkpoints: Option<Arc<wal::Checkpoints>>,
    /// Writes the last head to its file when the last handle goes.
    _flush: Option<Arc<head_file::FlushOnDrop>>,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl AuditLog {
    /// Verifies the chain (against the head kept in `head_file`, when there is one), loads
    /// its head and the recent card usage, and starts the writer. `retention_ms` is the longest
    /// window a claim will ask about (per-card limit or replay). A chain that does not verify
    /// is no error here: the log starts broken ([`AuditLog::broken`]) and refuses to append.
    pub async fn start(
        db: DatabaseConnection,
        retention_ms: i64,
        head_file: Option<HeadFile>,
    ) -> Result<Self, AuditError> {
        Self::start_fenced(db, retention_ms, head_file, None).await
    }

    /// [`AuditLog::start`], appending only while the lease of `fence` is held (PostgreSQL
    /// replicas, see `crate::lease`).
    pub async fn start_fenced(
        db: DatabaseConnection,
        retention_ms: i64,
        head_file: Option<HeadFile>,
        fence: Option<crate::lease::Fence>,
    ) -> Result<Self, AuditError> {
        let kept = head_file
            .as_ref()
            .map(HeadFile::read)
            .transpose()?
            .flatten();
        let expected = kept.as_ref().map(|k| AuditHead {
            sequence: k.seq,
            hash: k.hash.clone(),
            recorded_at: None,
            chain_id: CHAIN_ID.into(),
        });
        let verdict = walk(&db, 1, expected.as_ref()).await?;
        if let Some(fault) = &verdict.first_bad {
            let why: Arc<str> = match (&head_file, fault.kind) {
                (Some(file), Fault::HeadMissing | Fault::HeadMismatch) => {
                    format!("{} (head kept in {})", fault.detail, file.path().display()).into()
                }
                _ => fault.detail.as_str().into(),
            };
            tracing::error!(reason = %why, "the audit chain does not verify: custody refuses to serve");
            let (jobs, _) = mpsc::channel(1);
            return Ok(Self {
                jobs,
                db,
                broken: Some(why),
                _checkpoints: None,
                _flush: None,
            });
        }
        if head_file.is_some() && kept.is_none() && verdict.head_seq > 0 {
            tracing::warn!(
                records = verdict.head_seq,
                "no audit head file beside a non-empty audit log (first start of this version?): it is written from now on"
            );
        }
        let keeper = head_file.map(|file| Arc::new(HeadKeeper::new(file, kept.as_ref())));
        let state = State::load(&db, retention_ms).await?;
        let (jobs, rx) = mpsc::channel(4 * MAX_BATCH);
        // The writer gets a thread and a runtime of its own: as one task among the request
        // tasks it would wait behind all of them at each of its awaits, and every answer
        // waits for it (this alone tripled cryptogram latency under load).
        let sqlite_file = match db.get_database_backend() {
            sea_orm::DbBackend::Sqlite => Some(
                sink::sqlite_file(&db)
                    .await
                    .map_err(AuditError::Unavailable)?,
            ),
            _ => None,
        };
        let mut sink = Sink::new(db.clone(), sqlite_file.clone(), fence);
        let (opened, ready) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(AuditError::Thread)?;
        let writer_keeper = keeper.clone();
        std::thread::Builder::new()
            .name("custody-audit".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match sink.open().await {
                        Ok(()) => {
                            let _ = opened.send(Ok(()));
                            writer(sink, state, rx, writer_keeper).await;
                        }
                        Err(e) => {
                            let _ = opened.send(Err(e));
                        }
                    }
                })
            })
            .map_err(AuditError::Thread)?;
        ready
            .await
            .map_err(|_| AuditError::Stopped)?
            .map_err(AuditError::Unavailable)?;
        let checkpoints = sqlite_file
            .map(|file| wal::start(file, wal::WAL_RESTART_PAGES))
            .transpose()
            .map_err(AuditError::Thread)?;
        Ok(Self {
            jobs,
            db,
            broken: None,
            _checkpoints: checkpoints.map(Arc::new),
            _flush: keeper.map(|k| Arc::new(head_file::FlushOnDrop(k))),
        })
    }

    /// Why the chain did not verify at start, if it did not.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Records `event` (and decides `claim`) durably; returns once committed.
    pub async fn record(
        &self,
        event: Event,
        claim: Option<UsageClaim>,
    ) -> Result<Written, AuditError> {
        if let Some(why) = &self.broken {
            return Err(AuditError::Broken(why.clone()));
        }
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                event,
                claim,
                reply,
            })
            .await
            .map_err(|_| AuditError::Stopped)?;
        answer.await.map_err(|_| AuditError::Stopped)?
    }

    /// The last record's sequence number and hash (0 and the genesis hash when empty).
    pub async fn head(&self) -> Result<AuditHead, AuditError> {
        let last = audit_record::Entity::find()
            .order_by_desc(audit_record::Column::Seq)
            .one(&self.db)
            .await
            .map_err(AuditError::Read)?;
        Ok(match last {
            Some(r) => AuditHead {
                sequence: u64::try_from(r.seq).unwrap_or(0),
                hash: r.hash,
                recorded_at: Some(timestamp(r.at)),
                chain_id: CHAIN_ID.into(),
            },
            None => AuditHead {
                sequence: 0,
                hash: GENESIS.to_vec(),
                recorded_at: None,
                chain_id: CHAIN_ID.into(),
            },
        })
    }

    /// Walks the whole chain; with `expected`, also checks that head is still in it.
    pub async fn verify(&self, expected: Option<&AuditHead>) -> Result<Verdict, AuditError> {
        walk(&self.db, 1, expected).await
    }

    /// Walks the chain from record `from` (linked to the record before it); with `expected`,
    /// also checks that head is still in the chain.
    pub async fn verify_from(
        &self,
        from: u64,
        expected: Option<&AuditHead>,
    ) -> Result<Verdict, AuditError> {
        walk(&self.db, from, expected).await
    }

    /// The records a QueryAudit asks for.
    pub async fn query(&self, query: AuditQuery) -> Result<AuditPage, AuditError> {
        query.run(&self.db).await
    }
}

pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn to_proto(r: audit_record::Model) -> AuditRecord {
    AuditRecord {
        sequence: u64::try_from(r.seq).unwrap_or(0),
        recorded_at: Some(timestamp(r.at)),
        event: r.event,
        outcome: r.outcome,
        context: Some(AuthContext {
            actor_kind: r.actor_kind,
            actor_id: r.actor_id,
            on_behalf_of_user_id: r.user_id,
            card_id: r.card_id,
            flow: r.flow,
            approval_id: r.approval_id,
            request_id: r.request_id,
            ..Default::default()
        }),
        master_key_reference: r.key_reference,
        master_key_version: u32::try_from(r.key_version).unwrap_or(0),
        reason: r.reason,
        caller_identity: r.caller,
        previous_hash: r.prev_hash,
        hash: r.hash,
        attributes: serde_json::from_str(&r.attributes).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests;
