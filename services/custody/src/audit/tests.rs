//! The audit log against a real SQLite file: the chain, its faults, group commit, usage.

use sea_orm::ConnectionTrait;

use super::usage::Usage;
use super::*;
use crate::store::entities::card_use;

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
