//! What a helpdesk searches by and does all day, over real mTLS on SQLite and a throwaway
//! PostgreSQL: external ids (employee numbers) found exactly, apostrophes searched as nothing,
//! an estimate of the matches, and card registrations from many clients at once.

use cms_kit::client::Channel;
use cms_launcher::layout::Peers;
use cms_proto::common::v1::{CardProfile, PageRequest};
use cms_proto::directory::v1::directory_service_client::DirectoryServiceClient;
use cms_proto::directory::v1::*;
use cms_tests::inproc::{self, Running};
use cms_tests::pki::TestPki;
use cms_tests::postgres::{Backend, Postgres};

struct Env {
    _dir: tempfile::TempDir,
    directory: Running,
    config: cms_directory::Config,
    client: DirectoryServiceClient<Channel>,
}

/// The directory alone (no template service: template ids are checked for form only).
async fn start(backend: &Backend) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let mut config: cms_directory::Config =
        inproc::config(dir.path(), "directory", &Peers::default());
    config.database = backend.database();
    config.template = None;
    let directory = Running::start(config.clone(), cms_directory::run).await;
    let client = DirectoryServiceClient::new(inproc::channel(
        pki.tls("gateway"),
        directory.grpc,
        pki.id("directory"),
    ));
    Env {
        _dir: dir,
        directory,
        config,
        client,
    }
}

impl Env {
    async fn stop(self) {
        self.directory.stop().await.unwrap();
    }

    async fn user(&mut self, username: &str, display: &str, external_id: &str) -> User {
        self.client
            .create_user(CreateUserRequest {
                user: Some(User {
                    username: username.into(),
                    display_name: display.into(),
                    external_id: external_id.into(),
                    ..Default::default()
                }),
                auth: None,
            })
            .await
            .unwrap_or_else(|e| panic!("create {username}: {e:?}"))
            .into_inner()
            .user
            .unwrap()
    }

    async fn search_page(&mut self, query: &str, page_size: u32) -> SearchUsersResponse {
        self.client
            .search_users(SearchUsersRequest {
                query: query.into(),
                page: Some(PageRequest {
                    page_size,
                    page_token: String::new(),
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn search(&mut self, query: &str) -> Vec<UserSearchResult> {
        self.search_page(query, 50).await.results
    }
}

fn names(results: &[UserSearchResult]) -> Vec<String> {
    results
        .iter()
        .map(|r| r.user.as_ref().unwrap().username.clone())
        .collect()
}

fn card(user_id: &str, card_id: Vec<u8>, serial: String) -> RegisterCredentialRequest {
    RegisterCredentialRequest {
        credential: Some(Credential {
            user_id: user_id.into(),
            card_id,
            serial,
            atr: vec![0x3b, 0x8f],
            profile: CardProfile::Minidriver as i32,
            template_id: "0190a5b2-0000-7000-8000-000000000001".into(),
            template_version: 1,
            master_key_version: 1,
            ..Default::default()
        }),
        auth: None,
    }
}

async fn external_ids_are_found_exactly(backend: Backend) {
    let mut env = start(&backend).await;
    env.user("amiller", "Ann Miller", "E6663737").await;
    env.user("bkhan", "Bilal Khan", "HR-03513901").await;
    // Its username has the id of amiller inside: a substring match, after the exact one.
    env.user("zz-xe6663737", "Zed Other", "E1").await;
    // Its username has its own id: found once, with the exact matches.
    env.user("hr-03513901", "Cleo Same", "HR-03513901").await;

    let r = env.search("E6663737").await;
    assert_eq!(names(&r), ["amiller", "zz-xe6663737"]);
    assert!(r[0].prefix_match && !r[1].prefix_match);
    assert_eq!(r[0].matched_fields, [MatchField::ExternalId as i32]);
    assert_eq!(names(&env.search("e6663737").await), names(&r));
    assert_eq!(names(&env.search(" E6663737 ").await), names(&r));
    let r = env.search("HR-03513901").await;
    assert_eq!(names(&r), ["bkhan", "hr-03513901"]);
    assert!(r.iter().all(|x| x.prefix_match));
    assert!(
        r[1].matched_fields
            .contains(&(MatchField::ExternalId as i32))
    );
    assert!(r[1].matched_fields.contains(&(MatchField::Username as i32)));
    // Exactly: a part of an id is no match (only zz-xe6663737's username has it).
    assert_eq!(names(&env.search("6663737").await), ["zz-xe6663737"]);
    assert_eq!(names(&env.search("HR-0351").await), ["hr-03513901"]);
    // Paged one at a time: each user once, in order.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let resp = env
            .client
            .search_users(SearchUsersRequest {
                query: "hr-03513901".into(),
                page: Some(PageRequest {
                    page_size: 1,
                    page_token: token,
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(names(&resp.results));
        token = resp.page.unwrap().next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, ["bkhan", "hr-03513901"]);
    env.stop().await;
}

async fn apostrophes_count_as_nothing(backend: Backend) {
    let mut env = start(&backend).await;
    env.user("sobrien", "Seán O'Brien", "").await;
    env.user("darcy1", "Dana D’Arcy", "").await;
    env.user("obrienne", "Obrienne Test", "").await;
    for q in ["obrien", "O'Brien", "o’brien", "OBRIEN"] {
        let r = env.search(q).await;
        assert_eq!(names(&r), ["obrienne", "sobrien"], "{q}");
        assert!(r.iter().all(|x| x.prefix_match), "{q}");
        assert!(
            r[1].matched_fields
                .contains(&(MatchField::DisplayName as i32)),
            "{q}"
        );
    }
    for q in ["darcy", "d'arcy", "D’Arcy", "arcy"] {
        assert_eq!(names(&env.search(q).await), ["darcy1"], "{q}");
    }
    // Word starts after the apostrophe stay.
    let r = env.search("brien").await;
    assert_eq!(names(&r), ["sobrien", "obrienne"]);
    assert!(r[0].prefix_match && !r[1].prefix_match);
    // A query of nothing but an apostrophe searches for it.
    assert_eq!(names(&env.search("'").await), ["sobrien"]);
    env.stop().await;
}

async fn searches_estimate_their_matches(backend: Backend) {
    let mut env = start(&backend).await;
    for i in 0..30 {
        env.user(&format!("pager{i:02}"), &format!("Pager {i:02}"), "")
            .await;
    }
    env.user("other", "Someone Else", "").await;
    let first = env.search_page("pager", 10).await;
    assert_eq!(first.results.len(), 10);
    assert_eq!(first.page.unwrap().total_estimate, 30);
    // A last page counts exactly; an absent text finds none.
    assert_eq!(
        env.search_page("someone", 10)
            .await
            .page
            .unwrap()
            .total_estimate,
        1
    );
    assert_eq!(
        env.search_page("qqqq", 10)
            .await
            .page
            .unwrap()
            .total_estimate,
        0
    );
    // Everyone, paged.
    assert_eq!(
        env.search_page("", 10).await.page.unwrap().total_estimate,
        31
    );
    env.stop().await;
}

/// 16 clients register cards at once (a few with serials alike, some for the same users):
/// none fails, and each card is found by its serial.
async fn concurrent_registrations_never_fail(backend: Backend) {
    let mut env = start(&backend).await;
    let mut users = Vec::new();
    for i in 0..8 {
        users.push(
            env.user(&format!("holder{i}"), &format!("Holder {i}"), "")
                .await
                .id,
        );
    }
    let tasks = (0..16).map(|t| {
        let mut client = env.client.clone();
        let users = users.clone();
        tokio::spawn(async move {
            for i in 0..40u32 {
                let user = &users[(t + i as usize) % users.len()];
                let serial = format!("SC-{t:02}-{i:04}");
                let card_id = format!("card-{t}-{i}").into_bytes();
                if let Err(e) = client
                    .register_credential(card(user, card_id, serial))
                    .await
                {
                    panic!("task {t} card {i}: {:?} {}", e.code(), e.message());
                }
                if i % 10 == 5 {
                    // A card registered again fails alone, amid the others' registrations.
                    let again = format!("card-{t}-{}", i - 5).into_bytes();
                    let e = client
                        .register_credential(card(user, again, format!("DUP-{t}-{i}")))
                        .await
                        .unwrap_err();
                    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
                }
            }
        })
    });
    for task in futures_util::future::join_all(tasks).await {
        task.unwrap();
    }
    for q in ["SC-00-0000", "sc150039", "SC-07-0021"] {
        let r = env.search(q).await;
        assert_eq!(r.len(), 1, "{q}");
        assert_eq!(r[0].matched_credentials.len(), 1, "{q}");
    }
    let all: usize = env
        .search("sc-")
        .await
        .iter()
        .map(|r| r.credential_count as usize)
        .sum();
    assert_eq!(all, 16 * 40);
    // The same card twice is refused as such, not as an internal error.
    let again = env
        .client
        .register_credential(card(&users[0], b"card-0-0".to_vec(), "SC-X".into()))
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::AlreadyExists);
    env.stop().await;
}

/// Another writer holds the database's write lock (SQLite) or the search index's lock
/// (PostgreSQL) longer than a registration may wait: the registration is refused as
/// UNAVAILABLE with a retry hint, not as an internal error, and succeeds once the lock is gone.
async fn a_registration_that_cannot_proceed_is_unavailable(backend: Backend) {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let mut env = start(&backend).await;
    let user = env.user("holder", "Holder", "").await.id;
    let db = cms_directory::open_database(&env.config).await.unwrap();
    let blocker = if db.get_database_backend() == sea_orm::DbBackend::Postgres {
        let txn = db.begin().await.unwrap();
        let key = cms_kit::db::advisory_lock_key("cms-directory/search-index");
        txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({key})"))
            .await
            .unwrap();
        txn
    } else {
        db.begin_with_options(sea_orm::TransactionOptions {
            sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
            ..Default::default()
        })
        .await
        .unwrap()
    };
    let started = std::time::Instant::now();
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        env.client
            .register_credential(card(&user, b"blocked".to_vec(), "SC-B".into())),
    )
    .await
    .expect("an answer while the lock is held")
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let detail = cms_kit::error_details::detail(&refused).expect("a CMS error detail");
    assert!(detail.retry_after_seconds > 0, "{detail:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    blocker.rollback().await.unwrap();
    // Nothing was written: the same card registers now.
    env.client
        .register_credential(card(&user, b"blocked".to_vec(), "SC-B".into()))
        .await
        .unwrap();
    env.stop().await;
}

/// Every page of a search through the directory itself (no gRPC): usernames, each with
/// whether it matched by a word start (`prefix_match`).
async fn all_pages(
    d: &cms_directory::Directory,
    query: &str,
    page_size: u32,
) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let r = d
            .search_users(&SearchUsersRequest {
                query: query.into(),
                page: Some(PageRequest {
                    page_size,
                    page_token: token.clone(),
                }),
                ..Default::default()
            })
            .await
            .unwrap();
        out.extend(
            r.results
                .iter()
                .map(|x| (x.user.as_ref().unwrap().username.clone(), x.prefix_match)),
        );
        token = r.page.unwrap().next_page_token;
        if token.is_empty() {
            return out;
        }
    }
}

/// Checks every query against a scan of `users` (username, display name, email): the word
/// starts first, then the other substrings, each exactly the users whose search document has
/// the query so, each user once.
async fn matches_scan(
    d: &cms_directory::Directory,
    users: &[(String, String, String)],
    queries: &[String],
) {
    use cms_directory::normalize;
    for q in queries {
        let found = all_pages(d, q, 7).await;
        let folded = normalize::query(&normalize::fold(q));
        let (mut starts, mut inside) = (Vec::new(), Vec::new());
        for (u, n, e) in users {
            let doc = normalize::search_doc(n, u, e, &[]);
            if normalize::prefix_doc(&doc).contains(&format!("\u{1f}{folded}")) {
                starts.push(u.clone());
            } else if doc.contains(&folded) {
                inside.push(u.clone());
            }
        }
        let tier = |first: bool| {
            let mut v: Vec<String> = found
                .iter()
                .filter(|(_, p)| *p == first)
                .map(|(u, _)| u.clone())
                .collect();
            v.sort();
            v
        };
        starts.sort();
        inside.sort();
        assert_eq!(tier(true), starts, "{q:?}: word starts");
        assert_eq!(tier(false), inside, "{q:?}: other substrings");
        let first_other = found.iter().position(|(_, p)| !p).unwrap_or(found.len());
        assert!(
            found[first_other..].iter().all(|(_, p)| !p),
            "{q:?}: a word start after other matches"
        );
    }
}

/// Queries of one and two characters, rare and common (with punctuation), and strings no
/// user has, find exactly the users whose text has them (word starts first): checked against
/// every user, then again after users were renamed and their emails changed.
async fn short_and_absent_queries_find_what_a_scan_finds(backend: Backend) {
    let env = start(&backend).await;
    let db = cms_directory::open_database(&env.config).await.unwrap();
    let d = cms_directory::Directory::new(
        db,
        cms_directory::secrets::SecretKey::from_bytes(&[3; 32]),
        Default::default(),
    );
    const FIRST: &[&str] = &["Ann", "Qasim", "Xavier", "Zoë", "Jo", "Åsa", "Bob"];
    const LAST: &[&str] = &["O'Neil", "Smith-Qx", "Berg", "Eze", "Lüx", "Wq", "Ma"];
    let mut users = Vec::new();
    let mut ids = Vec::new();
    let mut seed = 7u64;
    for i in 0..160 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let pick = |n: usize, shift: u32| (seed >> shift) as usize % n;
        let display = format!(
            "{} {}",
            FIRST[pick(FIRST.len(), 33)],
            LAST[pick(LAST.len(), 40)]
        );
        let username = format!("u{i}{}", ["", "x", "+0", "..", "$"][pick(5, 47)]);
        let email = if pick(3, 52) == 0 {
            String::new()
        } else {
            format!(
                "{}{i}@{}",
                ["a.b", "q", "z_z"][pick(3, 55)],
                ["ex.com", "w.q"][pick(2, 58)]
            )
        };
        let user = d
            .create_user(Some(User {
                username: username.clone(),
                display_name: display.clone(),
                email: email.clone(),
                ..Default::default()
            }))
            .await
            .unwrap();
        ids.push(user.id);
        users.push((username, display, email));
    }
    let mut queries: Vec<String> = Vec::new();
    let alphabet: Vec<char> = "aeqxzwo019@.+$-_'ü".chars().collect();
    for a in &alphabet {
        queries.push(a.to_string());
        for b in ["a", "q", "x", ".", "@", "0", "$"] {
            queries.push(format!("{a}{b}"));
        }
    }
    queries.extend(
        [
            "zzqx", "qqqqq", "@@@", "xq", "q.q.q", "$$", "@@", "..", "+0", "’", "o’n", "'",
        ]
        .map(String::from),
    );
    matches_scan(&d, &users, &queries).await;

    // Renamed users and changed emails move between the lists of their old and new text.
    for (i, id) in ids.iter().enumerate().step_by(3) {
        let (username, display, email) = &mut users[i];
        *display = format!("{display} Qu'x");
        *email = if email.is_empty() {
            format!("new{i}@q.q")
        } else {
            String::new()
        };
        d.update_user(
            Some(User {
                id: id.clone(),
                username: username.clone(),
                display_name: display.clone(),
                email: email.clone(),
                ..Default::default()
            }),
            Some(prost_types::FieldMask {
                paths: vec!["display_name".into(), "email".into()],
            }),
        )
        .await
        .unwrap();
    }
    matches_scan(&d, &users, &queries).await;
    env.stop().await;
}

/// An import's WAL is checkpointed into the database and truncated when the import commits
/// (SQLite's own checkpoints leave the file as large as the import made it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_is_truncated_after_an_import() {
    let env = start(&Backend::Sqlite).await;
    let mut csv = String::from("username,display_name,email,phone,org_unit,external_id\n");
    for i in 0..3_000 {
        csv.push_str(&format!(
            "imported{i},Imported Person {i},p{i}@example.com,,Staff,E{i:07}\n"
        ));
    }
    let mut messages = vec![ImportUsersRequest {
        payload: Some(import_users_request::Payload::Options(ImportUsersOptions {
            update_existing: true,
            disable_missing: false,
            dry_run: false,
            has_header: true,
            delimiter: String::new(),
            overwrite_ldap_users: false,
        })),
        auth: None,
    }];
    for chunk in csv.as_bytes().chunks(64 * 1024) {
        messages.push(ImportUsersRequest {
            payload: Some(import_users_request::Payload::CsvChunk(chunk.to_vec())),
            auth: None,
        });
    }
    let report = env
        .client
        .clone()
        .import_users(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(report.created, 3_000);
    let wal = env.config.data_dir.join("directory.sqlite3-wal");
    let len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(len, 0, "{} bytes left in {}", len, wal.display());
    env.stop().await;
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(Backend::Sqlite).await })*
        }
        mod postgres {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(Backend::Postgres(Postgres::shared())).await })*
        }
    };
}

on_both_backends!(
    external_ids_are_found_exactly,
    apostrophes_count_as_nothing,
    searches_estimate_their_matches,
    concurrent_registrations_never_fail,
    a_registration_that_cannot_proceed_is_unavailable,
    short_and_absent_queries_find_what_a_scan_finds,
);
