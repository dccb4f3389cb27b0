//! The directory's storage layer on SQLite, without gRPC.

use cms_directory::{Directory, SelfServiceSettings, secrets::SecretKey};
use cms_proto::common::v1::PageRequest;
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

/// Creates users from (username, display name) pairs.
async fn create(d: &Directory, users: &[(&str, &str)]) {
    for (username, display_name) in users {
        d.create_user(Some(User {
            username: (*username).into(),
            display_name: (*display_name).into(),
            ..Default::default()
        }))
        .await
        .expect("create user");
    }
}

#[tokio::test]
async fn search_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let d = directory(dir.path()).await;
    create(&d, &[("jdoe", "Jane Doe"), ("zaberg", "Zoë Åberg")]).await;
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

/// Every page of a search, as usernames.
async fn pages(d: &Directory, query: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let r = d
            .search_users(&SearchUsersRequest {
                query: query.into(),
                page: Some(PageRequest {
                    page_size: 7,
                    page_token: token.clone(),
                }),
                ..Default::default()
            })
            .await
            .expect("search");
        out.extend(
            r.results
                .iter()
                .map(|x| x.user.as_ref().expect("a user").username.clone()),
        );
        token = r.page.expect("a page").next_page_token;
        if token.is_empty() {
            return out;
        }
    }
}

/// Users created one after the other into the same gap of page order use up the room between
/// their neighbours' sort ranks; the index then renumbers neighbours, and searches keep the
/// page order.
#[tokio::test]
async fn crowded_inserts_renumber_and_keep_page_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = directory(dir.path()).await;
    create(&d, &[("first", "Aaa Person"), ("last", "Zzz Person")]).await;
    // Each new name sorts just before the previous one: every user halves the same gap.
    let mut expected = vec!["first".to_owned()];
    for i in 0..120 {
        let name = format!("Mid {}", "m".repeat(200 - i));
        d.create_user(Some(User {
            username: format!("mid{i:03}"),
            display_name: name,
            email: format!("mid{i:03}@example.com"),
            ..Default::default()
        }))
        .await
        .unwrap();
        expected.insert(1, format!("mid{i:03}"));
    }
    expected.push("last".to_owned());
    assert_eq!(pages(&d, "").await, expected);
    assert_eq!(pages(&d, "person").await, ["first", "last"]);
    let mids: Vec<String> = expected[1..121].to_vec();
    assert_eq!(pages(&d, "mid").await, mids, "word starts, in page order");
    assert_eq!(
        pages(&d, "@example").await,
        mids,
        "substrings, in page order"
    );
    assert_eq!(pages(&d, "mmmm").await, mids);
    // Renaming moves a user in page order (and in the index).
    let found = d
        .search_users(&SearchUsersRequest {
            query: "mid050".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut user = found.results[0].user.clone().unwrap();
    user.display_name = "Zzzz Moved".into();
    d.update_user(
        Some(user),
        Some(prost_types::FieldMask {
            paths: vec!["display_name".into()],
        }),
    )
    .await
    .unwrap();
    let all = pages(&d, "").await;
    assert_eq!(all.last().map(String::as_str), Some("mid050"));
    assert_eq!(pages(&d, "moved").await, ["mid050"]);
    assert!(!pages(&d, "mmmm").await.contains(&"mid050".to_owned()));
}

/// A database of the first schema, with users, gets the search index filled by migration 2.
#[tokio::test]
async fn upgrade_indexes_existing_users() {
    use sea_orm::ConnectionTrait;
    use sea_orm_migration::MigratorTrait;
    let dir = tempfile::tempdir().unwrap();
    let db = cms_kit::db::connect(&Default::default(), dir.path(), "directory")
        .await
        .unwrap();
    cms_directory::migration::Migrator::up(&db, Some(1))
        .await
        .unwrap();
    for (i, (username, display)) in [
        ("zed", "Zed Last"),
        ("ann", "Ann First"),
        ("mo", "Mo Middle"),
    ]
    .iter()
    .enumerate()
    {
        let doc = cms_directory::normalize::search_doc(display, username, "", &[]);
        let prefix = cms_directory::normalize::prefix_doc(&doc);
        db.execute_raw(sea_orm::Statement::from_sql_and_values(
            db.get_database_backend(),
            "INSERT INTO users (id, username, username_key, display_name, display_key, email, phone, \
             org_unit, status, external_id, source, search_doc, prefix_doc, totp_state, totp_params, \
             totp_pending_params, created_at, updated_at, revision) \
             VALUES (?, ?, ?, ?, ?, '', '', '', 1, '', 1, ?, ?, 0, '', '', 0, 0, 1)",
            [
                format!("00000000-0000-7000-8000-00000000000{i}").into(),
                username.to_string().into(),
                username.to_string().into(),
                display.to_string().into(),
                cms_directory::normalize::fold(display).into(),
                doc.into(),
                prefix.into(),
            ],
        ))
        .await
        .unwrap();
    }
    drop(db);
    let db = cms_kit::db::connect(&Default::default(), dir.path(), "directory")
        .await
        .unwrap();
    cms_directory::migration::run(&db).await.unwrap();
    drop(db);
    let d = directory(dir.path()).await;
    assert_eq!(pages(&d, "").await, ["ann", "mo", "zed"]);
    assert_eq!(pages(&d, "mid").await, ["mo"]);
    assert_eq!(pages(&d, "ast").await, ["zed"]);
    create(&d, &[("nia", "Nia Next")]).await;
    assert_eq!(pages(&d, "").await, ["ann", "mo", "nia", "zed"]);
}

#[tokio::test]
async fn span_grams_migrate_down_and_up() {
    use sea_orm_migration::MigratorTrait;
    let dir = tempfile::tempdir().unwrap();
    let d = directory(dir.path()).await;
    create(&d, &[("ann.first", "Ann First"), ("jo.firth", "Jo Firth")]).await;
    assert_eq!(pages(&d, "nn.fi").await, ["ann.first"]);
    let db = cms_kit::db::connect(&Default::default(), dir.path(), "directory")
        .await
        .unwrap();
    // Without the span grams ("nn.f"), a substring across words has no list to read: the
    // down migration removed them all, and nothing else (migration 4's down changes nothing,
    // migration 5's takes only the short grams).
    cms_directory::migration::Migrator::down(&db, Some(3))
        .await
        .unwrap();
    assert!(pages(&d, "nn.fi").await.is_empty());
    assert_eq!(pages(&d, "firth").await, ["jo.firth"]);
    assert_eq!(pages(&d, "first").await, ["ann.first"]);
    cms_directory::migration::run(&db).await.unwrap();
    assert_eq!(pages(&d, "nn.fi").await, ["ann.first"]);
    assert_eq!(pages(&d, "o.fir").await, ["jo.firth"]);
}

/// Migration 5 adds the short grams of the users already there (and its down migration takes
/// them away again, with the grams of one word-start character back).
#[tokio::test]
async fn short_grams_migrate_down_and_up() {
    use sea_orm::ConnectionTrait;
    use sea_orm_migration::MigratorTrait;
    let dir = tempfile::tempdir().unwrap();
    let d = directory(dir.path()).await;
    create(&d, &[("ann.first", "Ann First"), ("jo.firth", "Jo Firth")]).await;
    let db = cms_kit::db::connect(&Default::default(), dir.path(), "directory")
        .await
        .unwrap();
    let count = |first: char| {
        let db = &db;
        async move {
            let row = db
                .query_one_raw(sea_orm::Statement::from_sql_and_values(
                    db.get_database_backend(),
                    "SELECT count(*) AS n FROM search_postings WHERE substr(gram, 1, 1) = ?",
                    [first.to_string().into()],
                ))
                .await
                .unwrap()
                .unwrap();
            row.try_get::<i64>("", "n").unwrap()
        }
    };
    assert_eq!(pages(&d, "nn").await, ["ann.first"]);
    assert_eq!(pages(&d, "j").await, ["jo.firth"]);
    cms_directory::migration::Migrator::down(&db, Some(1))
        .await
        .unwrap();
    assert_eq!(count('\u{1e}').await + count('\u{1d}').await, 0);
    // This build finds short queries by their short grams only.
    assert!(pages(&d, "nn").await.is_empty());
    cms_directory::migration::run(&db).await.unwrap();
    assert!(count('\u{1e}').await > 0 && count('\u{1d}').await > 0);
    assert_eq!(pages(&d, "nn").await, ["ann.first"]);
    assert_eq!(pages(&d, "j").await, ["jo.firth"]);
    assert_eq!(pages(&d, "fi").await, ["ann.first", "jo.firth"]);
    assert_eq!(pages(&d, "t").await, ["ann.first", "jo.firth"]);
}

/// Users stored before apostrophes were searched as nothing get the second, bare field in
/// their search documents (migration 4), and so are found without the apostrophe.
#[tokio::test]
async fn apostrophe_documents_are_rewritten() {
    use sea_orm::ConnectionTrait;
    use sea_orm_migration::MigratorTrait;
    let dir = tempfile::tempdir().unwrap();
    let db = cms_kit::db::connect(&Default::default(), dir.path(), "directory")
        .await
        .unwrap();
    cms_directory::migration::Migrator::up(&db, Some(1))
        .await
        .unwrap();
    // The documents as they were made before: each field once.
    for (i, (username, display, doc)) in [
        (
            "sobrien",
            "Seán O'Brien",
            "\u{1f}sean o'brien\u{1f}sobrien\u{1f}\u{1f}",
        ),
        (
            "darcy",
            "Dana D’Arcy",
            "\u{1f}dana d’arcy\u{1f}darcy\u{1f}\u{1f}",
        ),
        (
            "plain",
            "Plain Name",
            "\u{1f}plain name\u{1f}plain\u{1f}\u{1f}",
        ),
    ]
    .iter()
    .enumerate()
    {
        db.execute_raw(sea_orm::Statement::from_sql_and_values(
            db.get_database_backend(),
            "INSERT INTO users (id, username, username_key, display_name, display_key, email, phone, \
             org_unit, status, external_id, source, search_doc, prefix_doc, totp_state, totp_params, \
             totp_pending_params, created_at, updated_at, revision) \
             VALUES (?, ?, ?, ?, ?, '', '', '', 1, '', 1, ?, ?, 0, '', '', 0, 0, 1)",
            [
                format!("00000000-0000-7000-8000-00000000000{i}").into(),
                username.to_string().into(),
                username.to_string().into(),
                display.to_string().into(),
                cms_directory::normalize::fold(display).into(),
                doc.to_string().into(),
                cms_directory::normalize::prefix_doc(doc).into(),
            ],
        ))
        .await
        .unwrap();
    }
    cms_directory::migration::run(&db).await.unwrap();
    drop(db);
    let d = directory(dir.path()).await;
    assert_eq!(pages(&d, "obrien").await, ["sobrien"]);
    assert_eq!(pages(&d, "sean ob").await, ["sobrien"]);
    assert_eq!(pages(&d, "darcy").await, ["darcy"]);
    assert_eq!(pages(&d, "brien").await, ["sobrien"]);
    assert_eq!(pages(&d, "").await, ["darcy", "plain", "sobrien"]);
}
