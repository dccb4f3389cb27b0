//! Recent card usage, for the per-card limit and replay refusal: the writer's own index of
//! the granted claims, rebuilt at start from the audit records (and the legacy `card_use`
//! rows).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::{AuditError, now_ms};
use crate::store::entities::{audit_record, card_use};
use crate::wrap::{FINGERPRINT_LEN, Fingerprint};

/// (seq, at, card fingerprint, challenge fingerprint) of a record, as stored: the
/// fingerprints are those of a granted claim, or none.
type GrantedRow = (i64, i64, Option<Vec<u8>>, Option<Vec<u8>>);

/// Records read per query when the usage is rebuilt at start.
pub(super) const LOAD_PAGE: u64 = 10_000;

/// Hashes a fingerprint by its first eight bytes. A fingerprint is an HMAC under a key only
/// custody holds, so its bytes are already uniform and no caller can aim them at one bucket:
/// hashing them again (SipHash over the whole 32 bytes, twice per claim and per grant) was
/// pure cost in the writer.
#[derive(Default)]
pub(super) struct FingerprintHasher(u64);

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
pub(super) type FingerprintRefs<'a, V> =
    HashMap<&'a Fingerprint, V, BuildHasherDefault<FingerprintHasher>>;

/// A stored fingerprint, or `None` when it is not one (no claim can match it then).
fn stored_fingerprint(bytes: Option<Vec<u8>>) -> Option<Fingerprint> {
    bytes.and_then(|b| <[u8; FINGERPRINT_LEN]>::try_from(b.as_slice()).ok())
}

/// Recent answered challenges, by card: the writer's own index of the granted claims, so
/// deciding a claim needs no query. The audit records (and the legacy `card_use` rows) stay the
/// durable record it is rebuilt from at start.
pub(super) struct Usage {
    pub(super) retention_ms: i64,
    by_card: FingerprintMap<Vec<i64>>,
    challenges: FingerprintMap<i64>,
    pruned_at: i64,
}

impl Usage {
    pub(super) async fn load(
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

    pub(super) fn add(&mut self, card_fp: Fingerprint, challenge_fp: Fingerprint, at: i64) {
        self.by_card.entry(card_fp).or_default().push(at);
        self.challenges.insert(challenge_fp, at);
    }

    pub(super) fn replayed(&self, challenge_fp: &Fingerprint, since: i64) -> bool {
        self.challenges
            .get(challenge_fp)
            .is_some_and(|at| *at >= since)
    }

    pub(super) fn used(&self, card_fp: &Fingerprint, since: i64) -> usize {
        self.by_card
            .get(card_fp)
            .map_or(0, |uses| uses.iter().filter(|at| **at >= since).count())
    }

    /// Drops what no window can ask about any more (at most once a minute).
    pub(super) fn prune(&mut self, now: i64) {
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
