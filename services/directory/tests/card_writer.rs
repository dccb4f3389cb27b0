//! The card writer on SQLite, without gRPC.

use std::time::Duration;

use cms_directory::{Directory, SelfServiceSettings, secrets::SecretKey};
use cms_proto::common::v1::CardProfile;
use cms_proto::directory::v1::{Credential, User};
use sea_orm::{ConnectionTrait, TransactionTrait};

/// A registration does not wait for a pooled connection: the card writer has one of its own,
/// so it goes on while long reads hold every connection of the pool (before, it waited for
/// one of them to be given back, and failed when none was in time).
#[tokio::test]
async fn registrations_go_on_while_reads_hold_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let settings = cms_kit::db::DatabaseSettings {
        url: None,
        max_connections: 2,
    };
    let db = cms_kit::db::connect(&settings, dir.path(), "directory")
        .await
        .expect("open the SQLite file");
    cms_directory::migration::run(&db)
        .await
        .expect("migrations");
    let d = Directory::new(
        db.clone(),
        SecretKey::from_bytes(&[3; 32]),
        SelfServiceSettings::default(),
    );
    let owner = d
        .create_user(Some(User {
            username: "jdoe".into(),
            display_name: "Jane Doe".into(),
            ..Default::default()
        }))
        .await
        .expect("create user");
    let card = |n: u8| Credential {
        user_id: owner.id.clone(),
        card_id: vec![0x40, n],
        serial: format!("SC-{n}"),
        profile: CardProfile::Minidriver as i32,
        template_id: "00000000-0000-4000-8000-000000000001".into(),
        template_version: 1,
        master_key_version: 1,
        ..Default::default()
    };
    // The writer starts with the first registration.
    d.register_credential(Some(card(1)))
        .await
        .expect("first card");

    let mut readers = Vec::new();
    for _ in 0..settings.max_connections {
        let txn = db.begin().await.expect("a reader");
        txn.execute_unprepared("SELECT COUNT(*) FROM users")
            .await
            .expect("read");
        readers.push(txn);
    }
    let registered =
        tokio::time::timeout(Duration::from_secs(3), d.register_credential(Some(card(2))))
            .await
            .expect("the registration waited for a pooled connection")
            .expect("second card");
    assert_eq!(registered.serial, "SC-2");
    drop(readers);

    let listed = d
        .get_credential_by_card_id(&[0x40, 2])
        .await
        .expect("the second card is stored");
    assert_eq!(listed.id, registered.id);
}

/// The card writer's commits are checkpointed in the background: the WAL does not grow with
/// every registration (the writer's own connection leaves checkpoints to another).
#[tokio::test]
async fn registrations_leave_the_wal_small() {
    let dir = tempfile::tempdir().unwrap();
    let db = cms_kit::db::connect(&Default::default(), dir.path(), "directory")
        .await
        .expect("open the SQLite file");
    cms_directory::migration::run(&db)
        .await
        .expect("migrations");
    let d = Directory::new(
        db.clone(),
        SecretKey::from_bytes(&[3; 32]),
        SelfServiceSettings::default(),
    );
    let mut owners = Vec::new();
    for i in 0..20 {
        let u = d
            .create_user(Some(User {
                username: format!("holder{i}"),
                display_name: format!("Holder Number {i}"),
                ..Default::default()
            }))
            .await
            .expect("create user");
        owners.push(u.id);
    }
    let wal = dir.path().join("directory.sqlite3-wal");
    let mut largest = 0;
    for i in 0..300u32 {
        d.register_credential(Some(Credential {
            user_id: owners[i as usize % owners.len()].clone(),
            card_id: i.to_be_bytes().to_vec(),
            serial: format!("SC{:010}", u64::from(i) * 2_654_435_761 % 10_000_000_000),
            profile: CardProfile::Minidriver as i32,
            template_id: "00000000-0000-4000-8000-000000000001".into(),
            template_version: 1,
            master_key_version: 1,
            ..Default::default()
        }))
        .await
        .expect("register");
        if i % 10 == 0 {
            // Room for the background checkpoint to run (as between a helpdesk's calls).
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
    }
    assert!(
        largest < 8 << 20,
        "the WAL reached {largest} bytes during 300 registrations"
    );
}
