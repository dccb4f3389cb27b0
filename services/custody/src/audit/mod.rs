//! The audit log: every cryptogram, refusal and key-lifecycle event is one record of a
//! SHA-256 hash chain, committed durably before custody answers.
//!
//! One writer task, on a thread of its own, owns the chain head. Requests queue to it; it takes
//! whatever is waiting (group commit: one transaction and one sync for the batch: on SQLite an
//! fdatasync of the WAL, see `sink`), and answers each only once the batch is on disk.
//! Per-card limits and replay refusal are decided by the writer for the whole batch, in order,
//! so they hold under any concurrency. If the commit fails nobody gets an answer but an
//! error: custody fails closed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use cms_proto::common::v1::AuthContext;
use cms_proto::custody::v1::{AuditEvent, AuditHead, AuditOutcome, AuditRecord};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use tokio::sync::{mpsc, oneshot};

use crate::store::entities::{audit_record, card_use};
use crate::wrap::{FINGERPRINT_LEN, Fingerprint};

mod columns;
pub mod events;
pub mod gate;
mod head_file;
mod query;
mod sink;
mod wal;
pub use columns::record_hash;
pub use head_file::HeadFile;
use head_file::{HeadKeeper, KeptHead};
pub use query::{AuditPage, AuditQuery};
use sink::Sink;
pub(crate) use sink::sqlite_file;

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

struct Job {
    event: Event,
    claim: Option<UsageClaim>,
    reply: oneshot::Sender<Result<Written, AuditError>>,
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

#[derive(Clone)]
struct Head {
    seq: u64,
    hash: Vec<u8>,
}

/// What the writer carries from one batch to the next: the chain head and the recent usage,
/// as the database has them.
struct State {
    head: Head,
    usage: Usage,
}

impl State {
    async fn load(db: &DatabaseConnection, retention_ms: i64) -> Result<Self, AuditError> {
        let head = match audit_record::Entity::find()
            .order_by_desc(audit_record::Column::Seq)
            .one(db)
            .await
            .map_err(AuditError::Read)?
        {
            Some(last) => Head {
                seq: u64::try_from(last.seq).unwrap_or(0),
                hash: last.hash,
            },
            None => Head {
                seq: 0,
                hash: GENESIS.to_vec(),
            },
        };
        let usage = Usage::load(db, retention_ms, LOAD_PAGE).await?;
        Ok(Self { head, usage })
    }
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

/// Walks the whole chain; with `expected`, also checks that head is still in it.
async fn walk(
    db: &DatabaseConnection,
    from: u64,
    expected: Option<&AuditHead>,
) -> Result<Verdict, AuditError> {
    let mut verdict = Verdict::default();
    let mut prev = GENESIS.to_vec();
    let mut next_seq: i64 = 1;
    let mut expected_seen = false;
    let bad = |seq: u64, kind: Fault, detail: String| Some(ChainFault { seq, kind, detail });
    let find = |seq: i64| async move {
        audit_record::Entity::find_by_id(seq)
            .one(db)
            .await
            .map_err(AuditError::Read)
    };
    if from > 1 {
        // The walk starts linked to the record before `from`, which it takes as it is.
        let before = i64::try_from(from - 1).unwrap_or(i64::MAX);
        let Some(row) = find(before).await? else {
            verdict.first_bad = bad(
                from - 1,
                Fault::SequenceGap,
                format!("record {before} is missing"),
            );
            return Ok(verdict);
        };
        prev = row.hash;
        next_seq = before + 1;
        verdict.head_seq = from - 1;
        // A head before the walk is looked up on its own.
        if let Some(head) = expected.filter(|h| h.sequence > 0 && h.sequence < from) {
            let seq = head.sequence;
            verdict.first_bad = match find(i64::try_from(seq).unwrap_or(i64::MAX)).await? {
                Some(row) if row.hash == head.hash => None,
                Some(_) => bad(
                    seq,
                    Fault::HeadMismatch,
                    format!("record {seq} differs from the exported head"),
                ),
                None => bad(
                    seq,
                    Fault::HeadMissing,
                    format!("record {seq} of the exported head is missing"),
                ),
            };
            if verdict.first_bad.is_some() {
                return Ok(verdict);
            }
            expected_seen = true;
        }
    }
    loop {
        let rows = audit_record::Entity::find()
            .filter(audit_record::Column::Seq.gte(next_seq))
            .order_by_asc(audit_record::Column::Seq)
            .limit(1_000)
            .all(db)
            .await
            .map_err(AuditError::Read)?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            let seq = u64::try_from(row.seq).unwrap_or(0);
            let expected_seq = u64::try_from(next_seq).unwrap_or(0);
            let problem = if row.seq != next_seq {
                bad(
                    expected_seq,
                    Fault::SequenceGap,
                    format!("record {next_seq} is missing (next is {seq})"),
                )
            } else if row.prev_hash != prev {
                bad(
                    seq,
                    Fault::HashMismatch,
                    format!("record {seq} does not link to the record before it"),
                )
            } else if record_hash(&row) != row.hash {
                bad(
                    seq,
                    Fault::HashMismatch,
                    format!("record {seq} was changed"),
                )
            } else {
                None
            };
            if problem.is_some() {
                verdict.first_bad = problem;
                return Ok(verdict);
            }
            if let Some(head) = expected
                && head.sequence == seq
            {
                if head.hash != row.hash {
                    verdict.first_bad = bad(
                        seq,
                        Fault::HeadMismatch,
                        format!("record {seq} differs from the exported head"),
                    );
                    return Ok(verdict);
                }
                expected_seen = true;
            }
            verdict.checked += 1;
            verdict.head_seq = seq;
            prev = row.hash;
            next_seq += 1;
        }
    }
    verdict.head_hash = prev;
    if let Some(head) = expected
        && head.sequence > 0
        && !expected_seen
    {
        verdict.first_bad = bad(
            verdict.head_seq + 1,
            Fault::HeadMissing,
            format!(
                "the log ends at record {} but the exported head is record {}: it was truncated",
                verdict.head_seq, head.sequence
            ),
        );
    }
    Ok(verdict)
}

/// Why a chain does not verify: VerifyAudit's reason codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A record was changed, or does not link to the one before it.
    HashMismatch,
    /// A record is missing.
    SequenceGap,
    /// The record at the expected head's sequence is another one.
    HeadMismatch,
    /// The chain ends before the expected head: its tail was cut off.
    HeadMissing,
}

impl Fault {
    pub fn code(self) -> &'static str {
        match self {
            Self::HashMismatch => "HASH_MISMATCH",
            Self::SequenceGap => "SEQUENCE_GAP",
            Self::HeadMismatch => "HEAD_MISMATCH",
            Self::HeadMissing => "HEAD_MISSING",
        }
    }
}

/// Where and why a chain does not verify.
#[derive(Clone, Debug)]
pub struct ChainFault {
    /// The first sequence number that is bad.
    pub seq: u64,
    pub kind: Fault,
    /// What is wrong, for people.
    pub detail: String,
}

/// The result of a chain walk.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    pub checked: u64,
    pub head_seq: u64,
    pub head_hash: Vec<u8>,
    pub first_bad: Option<ChainFault>,
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

/// (seq, at, card fingerprint, challenge fingerprint) of a record, as stored: the
/// fingerprints are those of a granted claim, or none.
type GrantedRow = (i64, i64, Option<Vec<u8>>, Option<Vec<u8>>);

/// Records read per query when the usage is rebuilt at start.
const LOAD_PAGE: u64 = 10_000;

/// Hashes a fingerprint by its first eight bytes. A fingerprint is an HMAC under a key only
/// custody holds, so its bytes are already uniform and no caller can aim them at one bucket:
/// hashing them again (SipHash over the whole 32 bytes, twice per claim and per grant) was
/// pure cost in the writer.
#[derive(Default)]
struct FingerprintHasher(u64);

impl Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its length, then its bytes: the length is the same for every
        // key, and the bytes' first eight are the hash.
        let mut first = [0u8; 8];
        let n = bytes.len().min(8);
        first[..n].copy_from_slice(&bytes[..n]);
        self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(first);
    }

    fn write_usize(&mut self, _len: usize) {}
}

type FingerprintMap<V> = HashMap<Fingerprint, V, BuildHasherDefault<FingerprintHasher>>;
type FingerprintRefs<'a, V> = HashMap<&'a Fingerprint, V, BuildHasherDefault<FingerprintHasher>>;

/// A stored fingerprint, or `None` when it is not one (no claim can match it then).
fn stored_fingerprint(bytes: Option<Vec<u8>>) -> Option<Fingerprint> {
    bytes.and_then(|b| <[u8; FINGERPRINT_LEN]>::try_from(b.as_slice()).ok())
}

/// Recent answered challenges, by card: the writer's own index of the granted claims, so
/// deciding a claim needs no query. The audit records (and the legacy `card_use` rows) stay the
/// durable record it is rebuilt from at start.
struct Usage {
    retention_ms: i64,
    by_card: FingerprintMap<Vec<i64>>,
    challenges: FingerprintMap<i64>,
    pruned_at: i64,
}

impl Usage {
    async fn load(
        db: &DatabaseConnection,
        retention_ms: i64,
        page_size: u64,
    ) -> Result<Self, AuditError> {
        let mut usage = Self {
            retention_ms,
            by_card: FingerprintMap::default(),
            challenges: FingerprintMap::default(),
            pruned_at: now_ms(),
        };
        let since = now_ms() - retention_ms;
        let legacy = card_use::Entity::find()
            .filter(card_use::Column::At.gte(since))
            .all(db)
            .await
            .map_err(AuditError::Read)?;
        for row in legacy {
            if let (Some(card_fp), Some(challenge_fp)) = (
                stored_fingerprint(Some(row.card_fp)),
                stored_fingerprint(Some(row.challenge_fp)),
            ) {
                usage.add(card_fp, challenge_fp, row.at);
            }
        }
        // Records newest first by sequence number (the primary key: no index on `at` is
        // written with every record for this one read at start), until one is older than the
        // window by another window; the granted claims among them. Records are written in time
        // order; the margin covers a clock that was set back by up to one window since. Every
        // record counts for the stop, granted or not, so a log of refusals is not read whole.
        let mut before = i64::MAX;
        'pages: loop {
            let page: Vec<GrantedRow> = audit_record::Entity::find()
                .select_only()
                .column(audit_record::Column::Seq)
                .column(audit_record::Column::At)
                .column(audit_record::Column::CardFp)
                .column(audit_record::Column::ChallengeFp)
                .filter(audit_record::Column::Seq.lt(before))
                .order_by_desc(audit_record::Column::Seq)
                .limit(page_size)
                .into_tuple()
                .all(db)
                .await
                .map_err(AuditError::Read)?;
            let last_page = (page.len() as u64) < page_size;
            for (seq, at, card_fp, challenge_fp) in page {
                before = seq;
                if at < since.saturating_sub(retention_ms) {
                    break 'pages;
                }
                if at < since {
                    continue;
                }
                if let (Some(card_fp), Some(challenge_fp)) = (
                    stored_fingerprint(card_fp),
                    stored_fingerprint(challenge_fp),
                ) {
                    usage.add(card_fp, challenge_fp, at);
                }
            }
            if last_page {
                break;
            }
        }
        Ok(usage)
    }

    fn add(&mut self, card_fp: Fingerprint, challenge_fp: Fingerprint, at: i64) {
        self.by_card.entry(card_fp).or_default().push(at);
        self.challenges.insert(challenge_fp, at);
    }

    fn replayed(&self, challenge_fp: &Fingerprint, since: i64) -> bool {
        self.challenges
            .get(challenge_fp)
            .is_some_and(|at| *at >= since)
    }

    fn used(&self, card_fp: &Fingerprint, since: i64) -> usize {
        self.by_card
            .get(card_fp)
            .map_or(0, |uses| uses.iter().filter(|at| **at >= since).count())
    }

    /// Drops what no window can ask about any more (at most once a minute).
    fn prune(&mut self, now: i64) {
        if now - self.pruned_at < 60_000 {
            return;
        }
        self.pruned_at = now;
        let cutoff = now - self.retention_ms;
        self.challenges.retain(|_, at| *at >= cutoff);
        self.by_card.retain(|_, uses| {
            uses.retain(|at| *at >= cutoff);
            !uses.is_empty()
        });
    }
}

async fn writer(
    mut sink: Sink,
    state: State,
    mut rx: mpsc::Receiver<Job>,
    keeper: Option<Arc<HeadKeeper>>,
) {
    let retention_ms = state.usage.retention_ms;
    let mut state = Some(state);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // Whatever is waiting, up to MAX_BATCH, is one batch: one transaction, one sync.
    loop {
        let received = match keeper.as_ref().filter(|k| k.pending()) {
            // A committed head waits for its file: written when nothing comes for a while.
            Some(keeper) => {
                match tokio::time::timeout(
                    head_file::WRITE_INTERVAL,
                    rx.recv_many(&mut batch, MAX_BATCH),
                )
                .await
                {
                    Ok(received) => received,
                    Err(_idle) => {
                        keeper.flush();
                        continue;
                    }
                }
            }
            None => rx.recv_many(&mut batch, MAX_BATCH).await,
        };
        if received == 0 {
            break;
        }
        let mut current = match state.take() {
            Some(current) => current,
            None => {
                match State::load(sink.pool(), retention_ms).await {
                    Ok(loaded) => loaded,
                    Err(e) => {
                        tracing::error!(error = %e, records = batch.len(), "audit log unreadable; refusing the requests");
                        for job in batch.drain(..) {
                            let _ = job.reply.send(Err(AuditError::Unavailable(
                                sea_orm::DbErr::Custom(e.to_string()),
                            )));
                        }
                        continue;
                    }
                }
            }
        };
        let now = now_ms();
        let staged = stage(&current.head, &current.usage, &mut batch, now);
        match sink.insert(staged.rows).await {
            Ok(()) => {
                if let Some(keeper) = &keeper {
                    keeper.committed(KeptHead {
                        seq: staged.head.seq,
                        hash: staged.head.hash.clone(),
                    });
                }
                current.head = staged.head;
                for (card_fp, challenge_fp) in staged.granted {
                    current.usage.add(card_fp, challenge_fp, now);
                }
                current.usage.prune(now);
                state = Some(current);
                for (reply, written) in staged.replies {
                    let _ = reply.send(Ok(written));
                }
                // After the answers: a file write (once a second at most) delays nobody.
                if let Some(keeper) = &keeper {
                    keeper.write_if_due();
                }
            }
            Err(e) => {
                // The records may have reached the database even so (a commit whose sync
                // failed, or whose answer was lost), and then the chain goes on from them: the
                // next batch starts from what the database holds. Their requests are refused,
                // so a record without an answer can exist, never an answer without a record.
                tracing::error!(error = %e, records = staged.replies.len(), "audit commit failed; refusing the requests");
                for (reply, _) in staged.replies {
                    let _ = reply.send(Err(AuditError::Unavailable(clone_err(&e))));
                }
            }
        }
    }
    if let Some(keeper) = &keeper {
        keeper.flush();
    }
}

/// The attributes as stored: a JSON object with sorted keys, or "" when there are none.
fn encode_attributes(attributes: &BTreeMap<&'static str, String>) -> String {
    if attributes.is_empty() {
        String::new()
    } else {
        serde_json::to_string(attributes).unwrap_or_default()
    }
}

fn clone_err(e: &sea_orm::DbErr) -> sea_orm::DbErr {
    sea_orm::DbErr::Custom(e.to_string())
}

/// A batch ready to commit: its rows, the head after them, each job's outcome (sent once
/// committed) and the uses it grants.
struct Staged {
    rows: Vec<audit_record::Model>,
    head: Head,
    replies: Vec<(oneshot::Sender<Result<Written, AuditError>>, Written)>,
    granted: Vec<(Fingerprint, Fingerprint)>,
}

/// Decides every claim of the batch in order, counting the batch's own grants.
fn decide(usage: &Usage, jobs: &[Job], now: i64) -> Vec<Option<Refusal>> {
    let mut staged_cards: FingerprintRefs<usize> = FingerprintRefs::default();
    let mut staged_challenges: HashSet<&Fingerprint, BuildHasherDefault<FingerprintHasher>> =
        HashSet::default();
    jobs.iter()
        .map(|job| {
            let claim = job.claim.as_ref()?;
            let replayed = staged_challenges.contains(&claim.challenge_fp)
                || usage.replayed(&claim.challenge_fp, now - claim.replay_window_ms);
            let used = usage.used(&claim.card_fp, now - claim.window_ms)
                + staged_cards.get(&claim.card_fp).copied().unwrap_or(0);
            if replayed {
                Some(Refusal::Replay)
            } else if used >= claim.limit as usize {
                Some(Refusal::CardLimit)
            } else {
                *staged_cards.entry(&claim.card_fp).or_default() += 1;
                staged_challenges.insert(&claim.challenge_fp);
                None
            }
        })
        .collect()
}

/// Decides the batch's claims and turns its jobs (emptying `batch`) into hash-chained rows
/// after `head`. The jobs' strings move into the rows, and from there into the INSERT.
fn stage(head: &Head, usage: &Usage, batch: &mut Vec<Job>, now: i64) -> Staged {
    let refusals = decide(usage, batch, now);
    let mut staged = Staged {
        rows: Vec::with_capacity(batch.len()),
        head: head.clone(),
        replies: Vec::with_capacity(batch.len()),
        granted: Vec::new(),
    };
    for (job, refusal) in batch.drain(..).zip(refusals) {
        let Job {
            event,
            claim,
            reply,
        } = job;
        let Event {
            event,
            mut outcome,
            caller,
            context,
            key_reference,
            key_version,
            mut reason,
            attributes,
        } = event;
        let mut fingerprints = (None, None);
        match (claim, refusal) {
            (Some(claim), Some(refusal)) => {
                outcome = AuditOutcome::Refused as i32;
                reason = match refusal {
                    Refusal::Replay => "challenge already answered for this card".into(),
                    Refusal::CardLimit => format!(
                        "per-card limit of {} cryptograms in the window reached",
                        claim.limit
                    ),
                };
            }
            (Some(claim), None) => {
                staged.granted.push((claim.card_fp, claim.challenge_fp));
                fingerprints = (
                    Some(claim.card_fp.to_vec()),
                    Some(claim.challenge_fp.to_vec()),
                );
            }
            (None, _) => {}
        }
        let seq = staged.head.seq + 1;
        let mut row = audit_record::Model {
            seq: i64::try_from(seq).unwrap_or(i64::MAX),
            at: now,
            event,
            outcome,
            caller,
            actor_kind: context.actor_kind,
            actor_id: context.actor_id,
            user_id: context.on_behalf_of_user_id,
            card_id: context.card_id,
            flow: context.flow,
            approval_id: context.approval_id,
            request_id: context.request_id,
            key_reference,
            key_version: i32::try_from(key_version).unwrap_or(i32::MAX),
            reason,
            prev_hash: std::mem::take(&mut staged.head.hash),
            hash: Vec::new(),
            card_fp: fingerprints.0,
            challenge_fp: fingerprints.1,
            attributes: encode_attributes(&attributes),
        };
        row.hash = record_hash(&row);
        staged.head = Head {
            seq,
            hash: row.hash.clone(),
        };
        staged.rows.push(row);
        staged.replies.push((
            reply,
            match refusal {
                Some(refusal) => Written::Refused { seq, refusal },
                None => Written::Recorded { seq },
            },
        ));
    }
    staged
}

#[cfg(test)]
mod tests {
    use sea_orm::ConnectionTrait;

    use super::*;

    async fn log_with(records: u64) -> (AuditLog, crate::store::TestDatabase) {
        let db = crate::store::test_database().await;
        let log = AuditLog::start(db.clone(), 86_400_000, None).await.unwrap();
        for i in 0..records {
            let mut event = Event::new(
                AuditEvent::Cryptogram,
                AuditOutcome::Success,
                "spiffe://t/cms/gateway",
            );
            event.reason = format!("event {i}");
            log.record(event, None).await.unwrap();
        }
        (log, db)
    }

    async fn exec(db: &DatabaseConnection, sql: &str) {
        db.execute_unprepared(sql).await.unwrap();
    }

    async fn first_bad(log: &AuditLog, head: Option<&AuditHead>) -> Option<(u64, String)> {
        log.verify(head)
            .await
            .unwrap()
            .first_bad
            .map(|f| (f.seq, format!("{}: {}", f.kind.code(), f.detail)))
    }

    #[tokio::test]
    async fn an_intact_chain_verifies() {
        let (log, _db) = log_with(6).await;
        let head = log.head().await.unwrap();
        assert_eq!(head.sequence, 6);
        let verdict = log.verify(Some(&head)).await.unwrap();
        assert!(verdict.first_bad.is_none(), "{verdict:?}");
        assert_eq!((verdict.checked, verdict.head_seq), (6, 6));
        assert_eq!(verdict.head_hash, head.hash);
    }

    #[tokio::test]
    async fn a_changed_record_is_found() {
        let (log, db) = log_with(6).await;
        exec(
            &db,
            "UPDATE audit_record SET reason = 'nothing happened' WHERE seq = 3",
        )
        .await;
        let (seq, why) = first_bad(&log, None).await.unwrap();
        assert_eq!(seq, 3, "{why}");
        assert!(why.contains("changed"), "{why}");
    }

    #[tokio::test]
    async fn a_deleted_record_is_found() {
        let (log, db) = log_with(6).await;
        exec(&db, "DELETE FROM audit_record WHERE seq = 3").await;
        let (seq, why) = first_bad(&log, None).await.unwrap();
        assert_eq!(seq, 3);
        assert!(why.contains("missing"), "{why}");
    }

    #[tokio::test]
    async fn reordered_records_are_found() {
        let (log, db) = log_with(6).await;
        // Swap records 3 and 4, each keeping the other's sequence number.
        exec(&db, "UPDATE audit_record SET seq = -3 WHERE seq = 3").await;
        exec(&db, "UPDATE audit_record SET seq = 3 WHERE seq = 4").await;
        exec(&db, "UPDATE audit_record SET seq = 4 WHERE seq = -3").await;
        let (seq, _) = first_bad(&log, None).await.unwrap();
        assert_eq!(seq, 3);
    }

    #[tokio::test]
    async fn an_inserted_record_is_found() {
        let (log, db) = log_with(6).await;
        // Make room at 3 and slip in a copy of record 2 renumbered.
        for seq in (3..=6).rev() {
            exec(
                &db,
                &format!(
                    "UPDATE audit_record SET seq = {} WHERE seq = {seq}",
                    seq + 1
                ),
            )
            .await;
        }
        exec(
            &db,
            "INSERT INTO audit_record SELECT 3, at, event, outcome, caller, actor_kind, actor_id, user_id, card_id, flow, approval_id, request_id, key_reference, key_version, 'forged', prev_hash, hash, card_fp, challenge_fp, attributes FROM audit_record WHERE seq = 2",
        )
        .await;
        let (seq, _) = first_bad(&log, None).await.unwrap();
        assert_eq!(seq, 3);
    }

    #[tokio::test]
    async fn truncation_and_rewriting_are_found_against_an_exported_head() {
        let (log, db) = log_with(6).await;
        let head = log.head().await.unwrap();
        exec(&db, "DELETE FROM audit_record WHERE seq > 4").await;
        // The shorter chain is consistent in itself...
        assert!(first_bad(&log, None).await.is_none());
        // ...but not with the head exported before.
        let (_, why) = first_bad(&log, Some(&head)).await.unwrap();
        assert!(why.contains("truncated"), "{why}");

        // A chain rewritten from record 5 on, with hashes recomputed, differs from the head.
        let (log, db) = log_with(6).await;
        let head = log.head().await.unwrap();
        exec(&db, "DELETE FROM audit_record WHERE seq > 4").await;
        let rewritten = AuditLog::start(db.clone(), 86_400_000, None).await.unwrap();
        for _ in 0..2 {
            rewritten
                .record(
                    Event::new(AuditEvent::Cryptogram, AuditOutcome::Refused, "x"),
                    None,
                )
                .await
                .unwrap();
        }
        assert!(first_bad(&rewritten, None).await.is_none());
        let (seq, why) = first_bad(&rewritten, Some(&head)).await.unwrap();
        assert_eq!(seq, 6);
        assert!(why.contains("exported head"), "{why}");
    }

    #[tokio::test]
    async fn a_cut_tail_is_caught_at_start_by_the_head_file_and_a_lagging_file_is_not() {
        let db = crate::store::test_database().await;
        let dir = tempfile::tempdir().unwrap();
        let file = HeadFile::new(dir.path().join("audit.head"));
        let start = || AuditLog::start(db.clone(), 86_400_000, Some(file.clone()));
        let event = || Event::new(AuditEvent::Cryptogram, AuditOutcome::Success, "c");
        let log = start().await.unwrap();
        for _ in 0..6 {
            log.record(event(), None).await.unwrap();
        }
        // The last handle goes (shutdown): the head is written.
        drop(log);
        assert_eq!(file.read().unwrap().map(|h| h.seq), Some(6));

        // The file lags the database (a crash before its last write): no fault.
        let log = start().await.unwrap();
        assert!(log.broken().is_none());
        log.record(event(), None).await.unwrap();
        std::mem::forget(log); // as if killed: no write at exit
        let log = start().await.unwrap();
        assert!(log.broken().is_none(), "{:?}", log.broken());
        drop(log);

        // The tail is cut off below the kept head: custody refuses to append.
        exec(&db, "DELETE FROM audit_record WHERE seq > 4").await;
        let log = start().await.unwrap();
        let why = log
            .broken()
            .expect("a truncated chain starts broken")
            .to_owned();
        assert!(
            why.contains("truncated") && why.contains("audit.head"),
            "{why}"
        );
        assert!(matches!(
            log.record(event(), None).await,
            Err(AuditError::Broken(_))
        ));
        assert_eq!(
            log.head().await.unwrap().sequence,
            4,
            "nothing was appended"
        );
    }

    #[tokio::test]
    async fn verify_names_each_fault_by_its_code() {
        let code = |f: Option<(u64, String)>| f.unwrap().1.split(':').next().unwrap().to_owned();
        let (log, db) = log_with(6).await;
        let head = log.head().await.unwrap();
        exec(&db, "UPDATE audit_record SET reason = 'x' WHERE seq = 5").await;
        assert_eq!(code(first_bad(&log, None).await), "HASH_MISMATCH");
        exec(&db, "DELETE FROM audit_record WHERE seq >= 5").await;
        assert_eq!(code(first_bad(&log, Some(&head)).await), "HEAD_MISSING");
        exec(&db, "DELETE FROM audit_record WHERE seq = 2").await;
        assert_eq!(code(first_bad(&log, None).await), "SEQUENCE_GAP");
        let (log, _db) = log_with(3).await;
        let other = AuditHead {
            sequence: 2,
            hash: vec![7; 32],
            ..head
        };
        assert_eq!(code(first_bad(&log, Some(&other)).await), "HEAD_MISMATCH");
    }

    #[tokio::test]
    async fn a_walk_from_a_sequence_checks_only_the_rest() {
        let (log, db) = log_with(6).await;
        let head = log.head().await.unwrap();
        exec(&db, "UPDATE audit_record SET reason = 'x' WHERE seq = 2").await;
        assert_eq!(first_bad(&log, None).await.unwrap().0, 2);
        let verdict = log.verify_from(4, Some(&head)).await.unwrap();
        assert!(verdict.first_bad.is_none(), "{verdict:?}");
        assert_eq!((verdict.checked, verdict.head_seq), (3, 6));
        // A changed record after the start is found; so is a head from before it.
        exec(&db, "UPDATE audit_record SET reason = 'y' WHERE seq = 5").await;
        let fault = log.verify_from(4, None).await.unwrap().first_bad.unwrap();
        assert_eq!((fault.seq, fault.kind), (5, Fault::HashMismatch));
        let early = AuditHead {
            sequence: 1,
            hash: vec![9; 32],
            ..head
        };
        let fault = log
            .verify_from(6, Some(&early))
            .await
            .unwrap()
            .first_bad
            .unwrap();
        assert_eq!((fault.seq, fault.kind), (1, Fault::HeadMismatch));
    }

    #[tokio::test]
    async fn after_a_failed_commit_the_chain_goes_on_from_the_database() {
        use sea_orm::{ActiveModelTrait, IntoActiveModel};
        let (log, db) = log_with(2).await;
        // Record 3 reaches the database while the writer is told its commit failed (here:
        // written behind its back).
        let last = audit_record::Entity::find_by_id(2_i64)
            .one(&*db)
            .await
            .unwrap()
            .unwrap();
        let mut third = last.clone();
        third.seq = 3;
        third.prev_hash = last.hash;
        third.reason = "committed, answer lost".into();
        third.hash = record_hash(&third);
        third.into_active_model().insert(&*db).await.unwrap();

        let event = || Event::new(AuditEvent::Cryptogram, AuditOutcome::Success, "c");
        // The writer still thinks the head is record 2: its record 3 fails, and is refused...
        assert!(matches!(
            log.record(event(), None).await,
            Err(AuditError::Unavailable(_))
        ));
        // ...and the next batch goes on from record 3, as the database has it.
        assert_eq!(
            log.record(event(), None).await.unwrap(),
            Written::Recorded { seq: 4 }
        );
        let verdict = log.verify(None).await.unwrap();
        assert!(verdict.first_bad.is_none(), "{verdict:?}");
        assert_eq!(verdict.head_seq, 4);
    }

    #[tokio::test]
    async fn per_card_limit_and_replay_are_decided_in_order() {
        let (log, _db) = log_with(0).await;
        let claim = |challenge: u8| UsageClaim {
            card_fp: [1; 32],
            challenge_fp: [challenge; 32],
            limit: 2,
            window_ms: 60_000,
            replay_window_ms: 60_000,
        };
        let event = || Event::new(AuditEvent::Cryptogram, AuditOutcome::Success, "c");
        // Concurrent requests: exactly two granted, whatever the interleaving.
        let outcomes = futures_join(&log, (0..6).map(|i| (event(), claim(i))).collect()).await;
        let granted = outcomes
            .iter()
            .filter(|w| matches!(w, Written::Recorded { .. }))
            .count();
        assert_eq!(granted, 2, "{outcomes:?}");
        assert_eq!(
            log.record(event(), Some(claim(0))).await.unwrap(),
            Written::Refused {
                seq: 7,
                refusal: Refusal::Replay
            }
        );
    }

    #[tokio::test]
    async fn usage_is_rebuilt_at_start_from_audit_records_and_legacy_card_use_rows() {
        let (log, db) = log_with(0).await;
        // Fingerprints of a card, and of a challenge to that card.
        let card_fp = |card: u8| [card; 32];
        let challenge_fp = |card: u8, challenge: u8| {
            let mut fp = [card; 32];
            fp[31] = challenge;
            fp
        };
        let claim = |card: u8, challenge: u8| UsageClaim {
            card_fp: card_fp(card),
            challenge_fp: challenge_fp(card, challenge),
            limit: 2,
            window_ms: 60_000,
            replay_window_ms: 60_000,
        };
        let event = || Event::new(AuditEvent::Cryptogram, AuditOutcome::Success, "c");
        for challenge in [1, 2] {
            let written = log
                .record(event(), Some(claim(1, challenge)))
                .await
                .unwrap();
            assert!(matches!(written, Written::Recorded { .. }));
        }
        // A use written by a version before migration 4, in the table it had then.
        card_use::Entity::insert(card_use::ActiveModel {
            card_fp: sea_orm::Set(card_fp(2).to_vec()),
            challenge_fp: sea_orm::Set(challenge_fp(2, 1).to_vec()),
            at: sea_orm::Set(now_ms()),
            ..Default::default()
        })
        .exec(&*db)
        .await
        .unwrap();
        drop(log);

        let log = AuditLog::start(db.clone(), 86_400_000, None).await.unwrap();
        let refused = |refusal| Written::Refused { seq: 0, refusal };
        let outcome = |w: Written| match w {
            Written::Refused { refusal, .. } => refused(refusal),
            other => other,
        };
        assert_eq!(
            outcome(log.record(event(), Some(claim(1, 3))).await.unwrap()),
            refused(Refusal::CardLimit)
        );
        assert_eq!(
            outcome(log.record(event(), Some(claim(2, 1))).await.unwrap()),
            refused(Refusal::Replay)
        );
        assert!(matches!(
            log.record(event(), Some(claim(2, 2))).await.unwrap(),
            Written::Recorded { .. }
        ));
    }

    #[tokio::test]
    async fn usage_is_rebuilt_newest_first_until_records_are_a_window_older_than_the_window() {
        use sea_orm::{ActiveModelTrait, IntoActiveModel};
        let db = crate::store::test_database().await;
        const W: i64 = 60_000;
        let now = now_ms();
        // (seq, at, card, challenge): card 0 is a record with no claim.
        let records = [
            (1, now - 10, 1, 1),        // in the window, but behind the stop below
            (2, now - 3 * W, 2, 1),     // older than the window by more than a window: stop
            (3, now - 5_000, 3, 1),     // written before the clock was set back...
            (4, now - 3 * W / 2, 4, 1), // ...by more than the window (within the margin)
            (5, now - 2_000, 3, 2),
            (6, now - 1_000, 0, 0),
            (7, now - 500, 5, 1),
        ];
        for (seq, at, card, challenge) in records {
            let fp = |b: u8| (card > 0).then(|| vec![b; 32]);
            audit_record::Model {
                seq,
                at,
                event: AuditEvent::Cryptogram as i32,
                outcome: AuditOutcome::Success as i32,
                caller: "c".into(),
                actor_kind: 0,
                actor_id: String::new(),
                user_id: String::new(),
                card_id: vec![card],
                flow: 0,
                approval_id: String::new(),
                request_id: String::new(),
                key_reference: "k".into(),
                key_version: 1,
                reason: String::new(),
                prev_hash: vec![0; 32],
                hash: vec![0; 32],
                card_fp: fp(card),
                challenge_fp: fp(16 * card + challenge),
                attributes: String::new(),
            }
            .into_active_model()
            .insert(&*db)
            .await
            .unwrap();
        }
        for page_size in [1, 2, 3, 100] {
            let usage = Usage::load(&db, W, page_size).await.unwrap();
            let since = now - W;
            let used = |card: u8| usage.used(&[card; 32], since);
            let replayed =
                |card: u8, challenge: u8| usage.replayed(&[16 * card + challenge; 32], since);
            assert_eq!((used(3), used(5)), (2, 1), "page size {page_size}");
            assert!(replayed(3, 1) && replayed(3, 2) && replayed(5, 1));
            // Outside the window, or behind a record older than two windows.
            assert_eq!(
                (used(1), used(2), used(4)),
                (0, 0, 0),
                "page size {page_size}"
            );
            assert!(!replayed(1, 1) && !replayed(4, 1));
        }
    }

    async fn futures_join(log: &AuditLog, jobs: Vec<(Event, UsageClaim)>) -> Vec<Written> {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|(event, claim)| {
                let log = log.clone();
                tokio::spawn(async move { log.record(event, Some(claim)).await.unwrap() })
            })
            .collect();
        let mut out = Vec::new();
        for handle in handles {
            out.push(handle.await.unwrap());
        }
        out
    }
}
