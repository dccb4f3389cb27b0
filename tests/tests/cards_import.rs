//! The bulk card import through the front door, on SQLite and a throwaway PostgreSQL: the five
//! services as real processes over mTLS, `cmsctl cards import` against the gateway's
//! AdminService pass-through. Every refusal reason, idempotence, a dry run, the role check,
//! and uploads that break off (nothing imported); plus registrations that fail alone amid
//! many in flight.

use std::process::Output;

use cms_kit::pki::LeafSpec;
use cms_launcher::layout::Peers;
use cms_proto::common::v1::CardProfile;
use cms_proto::directory::v1::directory_service_client::DirectoryServiceClient;
use cms_proto::directory::v1::{
    CardRefusal, Credential, ImportCredentialsEnd, ImportCredentialsOptions,
    RegisterCredentialRequest, SearchUsersRequest,
};
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::admin_service_client::AdminServiceClient;
use cms_tests::cluster::Cluster;
use cms_tests::inproc::{self, Running};
use cms_tests::pki::TestPki;
use cms_tests::postgres::{Backend, Postgres};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ctl(cluster: &Cluster, args: &[&str]) -> Output {
    tokio::task::block_in_place(|| cluster.cmsctl(args))
}

/// A command that must succeed: its standard output.
fn ok(cluster: &Cluster, args: &[&str]) -> String {
    let out = ctl(cluster, args);
    assert!(out.status.success(), "cmsctl {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `--json` command: its exit code and parsed answer.
fn json(cluster: &Cluster, args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = ctl(cluster, &all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("cmsctl {args:?}: {e}: {}", text(&out)));
    (out.status.code(), value)
}

fn count(report: &serde_json::Value, key: &str) -> u64 {
    report[key].as_str().map_or(0, |n| n.parse().unwrap())
}

async fn cluster(backend: &Backend) -> Cluster {
    let url = backend.database().url;
    Cluster::start(move |name| match (&url, name) {
        (Some(url), "directory") => format!("\n[database]\nurl = {url:?}\n"),
        _ => String::new(),
    })
    .await
}

/// Master keys and the two sample templates: (minidriver template id, PIV template id).
fn templates(cluster: &Cluster) -> (String, String) {
    for (reference, algorithm) in [
        ("mk-minidriver", "3des-3key"),
        ("mk-piv", "aes-128"),
        ("mk-piv-puk", "aes-128"),
    ] {
        ok(
            cluster,
            &[
                "keys",
                "generate",
                "--reference",
                reference,
                "--algorithm",
                algorithm,
            ],
        );
    }
    let examples =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/templates");
    let mut ids = ["minidriver.toml", "piv.toml"].map(|file| {
        let path = examples.join(file);
        let (_, t) = json(
            cluster,
            &["templates", "create", "--file", path.to_str().unwrap()],
        );
        t["id"].as_str().unwrap().to_owned()
    });
    (std::mem::take(&mut ids[0]), std::mem::take(&mut ids[1]))
}

async fn cards_are_imported_through_the_front_door(backend: Backend) {
    let cluster = cluster(&backend).await;
    let work = cluster.dir.path().join("cards");
    std::fs::create_dir_all(&work).unwrap();
    let (minidriver, piv) = templates(&cluster);
    let users = work.join("users.csv");
    std::fs::write(
        &users,
        "username,display_name,external_id\nalice,Alice A.,E1001\nbob,Bob B.,E1002\ncarol,Carol C.,E1003\n",
    )
    .unwrap();
    ok(&cluster, &["users", "import", users.to_str().unwrap()]);
    let (_, dave) = json(&cluster, &["users", "create", "--username", "dave"]);
    ok(
        &cluster,
        &[
            "users",
            "disable",
            dave["id"].as_str().unwrap(),
            "--reason",
            "left",
        ],
    );

    let cards = work.join("cards.csv");
    std::fs::write(
        &cards,
        format!(
            "username,external_id,card_id,serial,profile,template_id,template_version,master_key_version,label\n\
             alice,,0102030405060708,SC-0001,minidriver,{minidriver},1,1,badge\n\
             ,E1002,A1B2 C3D4 E5F6 0718,YK-7712345,piv,{piv},1,1,YubiKey\n\
             carol,E1003,0a0b0c0d0e0f1011,SC-0003,minidriver,{minidriver},1,1,\n\
             nobody,,1111111111111111,SC-0004,minidriver,{minidriver},1,1,\n\
             bob,,0102030405060708,SC-0005,minidriver,{minidriver},1,1,\n\
             dave,,2222222222222222,SC-0006,minidriver,{minidriver},1,1,\n\
             alice,,not-hex,SC-0007,minidriver,{minidriver},1,1,\n\
             alice,,3333333333333333,SC-0008,minidriver,not-a-template,1,1,\n\
             alice,,0102030405060708,SC-0001,minidriver,{minidriver},1,1,badge\n\
             bob,E1003,5555555555555555,SC-0010,minidriver,{minidriver},1,1,\n"
        ),
    )
    .unwrap();
    let path = cards.to_str().unwrap();
    let (code, report) = json(&cluster, &["cards", "import", path]);
    assert_eq!(
        code,
        Some(1),
        "a refused line makes the exit code 1: {report}"
    );
    assert_eq!(
        (
            count(&report, "imported"),
            count(&report, "unchanged"),
            count(&report, "refused")
        ),
        (3, 1, 6),
        "{report}"
    );
    let refusals: Vec<(u64, String, String)> = report["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["line"].as_str().unwrap().parse().unwrap(),
                r["reason"].as_str().unwrap().to_owned(),
                r["column"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expected = [
        (5, CardRefusal::UnknownUser, "username"),
        (6, CardRefusal::CardIdTaken, "card_id"),
        (7, CardRefusal::UserDisabled, ""),
        (8, CardRefusal::BadLine, "card_id"),
        (9, CardRefusal::UnknownTemplate, "template_id"),
        (11, CardRefusal::UnknownUser, "username"),
    ]
    .map(|(line, reason, column)| (line, reason.as_str_name().to_owned(), column.to_owned()));
    assert_eq!(refusals, expected, "{report}");

    // The same file again changes nothing, and says so.
    let again = ctl(&cluster, &["cards", "import", path]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        stdout.contains("imported 0, unchanged 4, refused 6"),
        "{}",
        text(&again)
    );
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("line 6 (card_id): CARD_ID_TAKEN"),
        "{stderr}"
    );

    // The cards are registered and their serials found by the helpdesk search.
    let directory = DirectoryServiceClient::new(inproc::channel(
        cluster.pki.tls("gateway"),
        cluster.grpc("directory"),
        cluster.pki.id("directory"),
    ));
    for (serial, owner) in [
        ("SC-0001", "alice"),
        ("yk7712345", "bob"),
        ("SC-0003", "carol"),
    ] {
        let found = directory
            .clone()
            .search_users(SearchUsersRequest {
                query: serial.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        assert_eq!(found.len(), 1, "{serial}");
        assert_eq!(found[0].user.as_ref().unwrap().username, owner, "{serial}");
        assert_eq!(found[0].matched_credentials.len(), 1, "{serial}");
    }
    for absent in ["SC-0004", "SC-0005", "SC-0008"] {
        let found = directory
            .clone()
            .search_users(SearchUsersRequest {
                query: absent.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        assert!(found.is_empty(), "{absent} was refused, yet found");
    }

    // A dry run reports and changes nothing.
    let more = work.join("more.csv");
    std::fs::write(
        &more,
        format!(
            "external_id;card_id;serial;profile;template_id;template_version;master_key_version\n\
             E1002;6666666666666666;SC-0011;minidriver;{minidriver};1;1\n"
        ),
    )
    .unwrap();
    let more = more.to_str().unwrap();
    let dry = ok(
        &cluster,
        &["cards", "import", more, "--dry-run", "--delimiter", ";"],
    );
    assert!(
        dry.contains("dry run: imported 1, unchanged 0, refused 0"),
        "{dry}"
    );
    let real = ok(&cluster, &["cards", "import", more, "--delimiter", ";"]);
    assert!(real.contains("imported 1, unchanged 0"), "{real}");

    // A file that is not a card file is refused as a whole, by name.
    let wrong = work.join("wrong.csv");
    std::fs::write(&wrong, "username,shoe_size\nalice,42\n").unwrap();
    let out = ctl(&cluster, &["cards", "import", wrong.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.trim_end()
            .lines()
            .last()
            .unwrap()
            .starts_with("cmsctl: error: ")
            && err.contains("shoe_size"),
        "{err}"
    );

    // Only admin or directory-admin may import.
    ok(
        &cluster,
        &[
            "operators",
            "create",
            "--username",
            "helen",
            "--role",
            "helpdesk",
        ],
    );
    let helen = cluster.pki.issue(
        "operator-helen",
        &LeafSpec::new(cluster.pki.id("operator/helen"), 30),
    );
    let out = ctl(
        &cluster,
        &[
            "--cert",
            helen.cert.to_str().unwrap(),
            "--key",
            helen.key.to_str().unwrap(),
            "cards",
            "import",
            more,
        ],
    );
    assert!(
        !out.status.success() && text(&out).contains("permission denied"),
        "{}",
        text(&out)
    );

    // Uploads that break off import nothing: one that ends without its end message, and one
    // whose caller goes away in the middle.
    let admin = cluster.pki.issue(
        "operator-admin-raw",
        &LeafSpec::new(cluster.pki.id("operator/admin"), 30),
    );
    let mut client = AdminServiceClient::new(inproc::channel(
        admin,
        cluster.grpc("gateway"),
        cluster.pki.id("gateway"),
    ));
    let line = format!(
        "username,card_id,serial,profile,template_id,template_version,master_key_version\n\
         carol,7777777777777777,SC-0012,minidriver,{minidriver},1,1\n"
    );
    let options = gw::ImportCredentialsRequest {
        payload: Some(gw::import_credentials_request::Payload::Options(
            ImportCredentialsOptions::default(),
        )),
    };
    let chunk = gw::ImportCredentialsRequest {
        payload: Some(gw::import_credentials_request::Payload::CsvChunk(
            line.clone().into_bytes(),
        )),
    };
    let mut events = client
        .import_credentials(tokio_stream::iter([options.clone(), chunk.clone()]))
        .await
        .unwrap()
        .into_inner();
    let err = loop {
        match events.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("an upload without its end was imported"),
            Err(e) => break e,
        }
    };
    assert!(err.message().contains("nothing was changed"), "{err:?}");
    let wrong_total = gw::ImportCredentialsRequest {
        payload: Some(gw::import_credentials_request::Payload::End(
            ImportCredentialsEnd { total_bytes: 1 },
        )),
    };
    let mut events = client
        .import_credentials(tokio_stream::iter([
            options.clone(),
            chunk.clone(),
            wrong_total,
        ]))
        .await
        .unwrap()
        .into_inner();
    let err = loop {
        match events.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("an upload shorter than its end says was imported"),
            Err(e) => break e,
        }
    };
    assert!(err.message().contains("nothing was changed"), "{err:?}");
    let hanging = tokio_stream::StreamExt::chain(
        tokio_stream::iter([options, chunk]),
        futures_util::stream::pending(),
    );
    let mut caller = client.clone();
    let upload = tokio::spawn(async move {
        let mut events = caller.import_credentials(hanging).await?.into_inner();
        while events.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    upload.abort();
    let _ = upload.await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let rest = work.join("rest.csv");
    std::fs::write(&rest, &line).unwrap();
    let check = ok(
        &cluster,
        &["cards", "import", rest.to_str().unwrap(), "--dry-run"],
    );
    assert!(
        check.contains("imported 1, unchanged 0"),
        "the broken uploads imported their card: {check}"
    );
    cluster.stop().await;
}

/// The directory alone (no template service: template ids are checked for form only).
async fn directory(
    backend: &Backend,
) -> (
    tempfile::TempDir,
    Running,
    DirectoryServiceClient<cms_kit::client::Channel>,
) {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let mut config: cms_directory::Config =
        inproc::config(dir.path(), "directory", &Peers::default());
    config.database = backend.database();
    config.template = None;
    let running = Running::start(config, cms_directory::run).await;
    let client = DirectoryServiceClient::new(inproc::channel(
        pki.tls("gateway"),
        running.grpc,
        pki.id("directory"),
    ));
    (dir, running, client)
}

/// 16 clients register at once, among them cards for an unknown user, a disabled user and
/// card ids already taken: those fail alone, with their own codes, and every other card of
/// their groups is registered and found.
async fn registrations_fail_alone_amid_many(backend: Backend) {
    use cms_proto::directory::v1::{CreateUserRequest, DisableUserRequest, User};
    let (_dir, running, client) = directory(&backend).await;
    let mut ids = Vec::new();
    for name in ["holder0", "holder1", "holder2", "gone"] {
        let user = client
            .clone()
            .create_user(CreateUserRequest {
                user: Some(User {
                    username: name.into(),
                    ..Default::default()
                }),
                auth: None,
            })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        ids.push(user.id);
    }
    client
        .clone()
        .disable_user(DisableUserRequest {
            id: ids[3].clone(),
            reason: "left".into(),
            auth: None,
        })
        .await
        .unwrap();
    let card = |user: &str, card_id: String, serial: String, profile: CardProfile| {
        RegisterCredentialRequest {
            credential: Some(Credential {
                user_id: user.into(),
                card_id: card_id.into_bytes(),
                serial,
                profile: profile as i32,
                template_id: "0190a5b2-0000-7000-8000-000000000001".into(),
                template_version: 1,
                master_key_version: 1,
                ..Default::default()
            }),
            auth: None,
        }
    };
    let tasks = (0..16).map(|t| {
        let mut client = client.clone();
        let ids = ids.clone();
        tokio::spawn(async move {
            for i in 0..30u32 {
                let profile = if i % 2 == 0 {
                    CardProfile::Minidriver
                } else {
                    CardProfile::Piv
                };
                let owner = &ids[(t + i as usize) % 3];
                let r = client
                    .register_credential(card(
                        owner,
                        format!("c-{t}-{i}"),
                        format!("SN-{t:02}-{i:03}"),
                        profile,
                    ))
                    .await
                    .unwrap_or_else(|e| panic!("task {t} card {i}: {:?} {}", e.code(), e.message()))
                    .into_inner()
                    .credential
                    .unwrap();
                assert_eq!(r.puk_version, u32::from(profile == CardProfile::Piv));
                let (failing, code) = match i % 3 {
                    0 => (
                        card(
                            "0190a5b2-0000-7000-8000-00000000beef",
                            format!("x-{t}-{i}"),
                            "X".into(),
                            profile,
                        ),
                        tonic::Code::NotFound,
                    ),
                    1 => (
                        card(&ids[3], format!("y-{t}-{i}"), "Y".into(), profile),
                        tonic::Code::FailedPrecondition,
                    ),
                    _ => (
                        card(owner, format!("c-{t}-{}", i - 1), "Z".into(), profile),
                        tonic::Code::AlreadyExists,
                    ),
                };
                let e = client.register_credential(failing).await.unwrap_err();
                assert_eq!(e.code(), code, "task {t} card {i}: {e:?}");
            }
        })
    });
    for task in futures_util::future::join_all(tasks).await {
        task.unwrap();
    }
    let mut total = 0;
    for (i, id) in ids.iter().take(3).enumerate() {
        let found = client
            .clone()
            .search_users(SearchUsersRequest {
                query: format!("holder{i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        assert_eq!(found[0].user.as_ref().unwrap().id, *id);
        total += found[0].credential_count;
    }
    assert_eq!(total, 16 * 30);
    for serial in ["SN-00-000", "sn15029", "SN-07-011"] {
        let found = client
            .clone()
            .search_users(SearchUsersRequest {
                query: serial.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        assert_eq!(found.len(), 1, "{serial}");
        assert_eq!(found[0].matched_credentials.len(), 1, "{serial}");
    }
    running.stop().await.unwrap();
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
    cards_are_imported_through_the_front_door,
    registrations_fail_alone_amid_many
);
