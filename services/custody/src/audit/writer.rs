//! The writer: one task on a thread of its own owns the chain head; it takes whatever
//! requests are waiting as one batch, decides their claims in order, hash-chains them into
//! rows and commits them (one transaction, one sync) before anyone is answered.

use std::collections::{BTreeMap, HashSet};
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use cms_proto::custody::v1::AuditOutcome;
use sea_orm::{DatabaseConnection, EntityTrait, QueryOrder};
use tokio::sync::{mpsc, oneshot};

use super::head_file::{self, HeadKeeper, KeptHead};
use super::sink::Sink;
use super::usage::{FingerprintHasher, FingerprintRefs, LOAD_PAGE, Usage};
use super::{
    AuditError, Event, GENESIS, MAX_BATCH, Refusal, UsageClaim, Written, now_ms, record_hash,
};
use crate::store::entities::audit_record;
use crate::wrap::Fingerprint;

pub(super) struct Job {
    pub(super) event: Event,
    pub(super) claim: Option<UsageClaim>,
    pub(super) reply: oneshot::Sender<Result<Written, AuditError>>,
}

#[derive(Clone)]
pub(super) struct Head {
    seq: u64,
    hash: Vec<u8>,
}

/// What the writer carries from one batch to the next: the chain head and the recent usage,
/// as the database has them.
pub(super) struct State {
    head: Head,
    usage: Usage,
}

impl State {
    pub(super) async fn load(
        db: &DatabaseConnection,
        retention_ms: i64,
    ) -> Result<Self, AuditError> {
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

pub(super) async fn writer(
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
pub(super) struct Staged {
    rows: Vec<audit_record::Model>,
    head: Head,
    replies: Vec<(oneshot::Sender<Result<Written, AuditError>>, Written)>,
    granted: Vec<(Fingerprint, Fingerprint)>,
}

/// Decides every claim of the batch in order, counting the batch's own grants.
pub(super) fn decide(usage: &Usage, jobs: &[Job], now: i64) -> Vec<Option<Refusal>> {
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
pub(super) fn stage(head: &Head, usage: &Usage, batch: &mut Vec<Job>, now: i64) -> Staged {
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
