//! The directory's storage layer on SQLite, without gRPC.

use cms_directory::{Directory, SelfServiceSettings, secrets::SecretKey};
use cms_proto::directory::v1::{SearchUsersRequest, User};

async fn directory(dir: &std::path::Path) -> Directory {
    let settings = cms_kit::db::DatabaseSettings::default();
    let db = cms_kit::db::connect(&settings, dir, "directory")
        .await
        .expect("open the SQLite file");
    cms_directory::migration::run(&db)
        .await
        .expect("migrations");
    Directory::new(
        db,
        SecretKey::from_bytes(&[3; 32]),
        SelfServiceSettings::default(),
    )
}

#[tokio::test]
async fn search_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let d = directory(dir.path()).await;
    for (u, n) in [("jdoe", "Jane Doe"), ("zaberg", "Zoë Åberg")] {
        d.create_user(Some(User {
            username: u.into(),
            display_name: n.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    for q in ["", "zo", "aberg", "doe"] {
        let r = d
            .search_users(&SearchUsersRequest {
                query: q.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{q}: {e:?}"));
        assert!(!r.results.is_empty(), "{q}");
    }
}
