//! Verifying the chain: a walk from a record (linked to the one before it) to the end,
//! against an exported head when one is given; and the faults it names.

use cms_proto::custody::v1::AuditHead;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::{AuditError, GENESIS, record_hash};
use crate::store::entities::audit_record;

/// Walks the whole chain; with `expected`, also checks that head is still in it.
pub(super) async fn walk(
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
