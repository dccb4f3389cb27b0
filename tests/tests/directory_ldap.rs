//! LDAP sync against a real OpenLDAP slapd (started by the harness, users under an OU), on
//! SQLite and PostgreSQL: progress, report, idempotence, updates and disabling, paged reads
//! past the server's size limit, and refused syncs that change nothing.

use cms_kit::client::Channel;
use cms_launcher::layout::Peers;
use cms_proto::directory::v1::directory_service_client::DirectoryServiceClient;
use cms_proto::directory::v1::*;
use cms_tests::inproc::{self, Running};
use cms_tests::ldap::{SUFFIX, Slapd};
use cms_tests::pki::TestPki;
use cms_tests::postgres::{Backend, Postgres};
use tonic::Code;

async fn start(
    backend: &Backend,
    slapd: &Slapd,
    password_file: std::path::PathBuf,
) -> (tempfile::TempDir, Running, DirectoryServiceClient<Channel>) {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let mut config: cms_directory::Config =
        inproc::config(dir.path(), "directory", &Peers::default());
    config.database = backend.database();
    let source = |bind_dn: &str, password_file: std::path::PathBuf| cms_directory::LdapSource {
        url: slapd.url().to_owned(),
        bind_dn: Some(bind_dn.to_owned()),
        bind_password_file: Some(password_file),
        base_dn: format!("ou=people,{SUFFIX}"),
        filter: "(objectClass=inetOrgPerson)".into(),
        timeout_ms: 5_000,
        attributes: Default::default(),
        strict: false,
    };
    config.ldap.insert(
        "default".into(),
        source(cms_tests::ldap::ROOT_DN, password_file.clone()),
    );
    let mut strict = source(cms_tests::ldap::ROOT_DN, password_file.clone());
    strict.strict = true;
    config.ldap.insert("strict".into(), strict);
    let mut marked = source(cms_tests::ldap::ROOT_DN, password_file.clone());
    marked.attributes.disabled = Some(cms_directory::DisabledMarker {
        attribute: "employeeType".into(),
        values: vec!["terminated".into()],
        bit_mask: 0,
    });
    config.ldap.insert("marked".into(), marked);
    // Nothing listens on port 1.
    let mut unreachable = source(cms_tests::ldap::ROOT_DN, password_file.clone());
    unreachable.url = "ldap://127.0.0.1:1".into();
    unreachable.timeout_ms = 2_000;
    config.ldap.insert("unreachable".into(), unreachable);
    let wrong = dir.path().join("wrong-password");
    std::fs::write(&wrong, "not the password\n").unwrap();
    config.ldap.insert(
        "wrong-password".into(),
        source(cms_tests::ldap::ROOT_DN, wrong),
    );
    let server = Running::start(config, cms_directory::run).await;
    let client = DirectoryServiceClient::new(inproc::channel(
        pki.tls("gateway"),
        server.grpc,
        pki.id("directory"),
    ));
    (dir, server, client)
}

async fn sync(
    client: &mut DirectoryServiceClient<Channel>,
    source: &str,
    disable_missing: bool,
) -> Result<(Vec<SyncLdapProgress>, ImportReport), tonic::Status> {
    let mut stream = client
        .sync_ldap(SyncLdapRequest {
            source: source.into(),
            disable_missing,
            dry_run: false,
            auth: None,
        })
        .await?
        .into_inner();
    let mut progress = Vec::new();
    let mut report = None;
    while let Some(event) = stream.message().await? {
        match event.event.unwrap() {
            sync_ldap_response::Event::Progress(p) => progress.push(p),
            sync_ldap_response::Event::Report(r) => report = Some(r),
        }
    }
    Ok((progress, report.expect("a final report")))
}

/// Imports `csv` (with a header), updating existing users.
async fn import_csv(
    client: &mut DirectoryServiceClient<Channel>,
    csv: &str,
    overwrite_ldap_users: bool,
) -> Result<ImportReport, tonic::Status> {
    use cms_proto::directory::v1::{ImportUsersOptions, ImportUsersRequest, import_users_request};
    let messages = vec![
        ImportUsersRequest {
            payload: Some(import_users_request::Payload::Options(ImportUsersOptions {
                update_existing: true,
                has_header: true,
                overwrite_ldap_users,
                ..Default::default()
            })),
            auth: None,
        },
        ImportUsersRequest {
            payload: Some(import_users_request::Payload::CsvChunk(
                csv.as_bytes().to_vec(),
            )),
            auth: None,
        },
    ];
    let answer = client.import_users(tokio_stream::iter(messages)).await?;
    Ok(answer.into_inner().report.unwrap_or_default())
}

async fn search(client: &mut DirectoryServiceClient<Channel>, query: &str) -> Vec<User> {
    client
        .search_users(SearchUsersRequest {
            query: query.into(),
            page: Some(cms_proto::common::v1::PageRequest {
                page_size: 500,
                page_token: String::new(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .into_iter()
        .map(|r| r.user.unwrap())
        .collect()
}

async fn ldap_sync(backend: Backend) {
    let slapd = Slapd::start();
    slapd.add(&format!(
        "dn: ou=Finance,ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: Finance\n\n"
    ));
    let mut ldif = String::new();
    ldif.push_str(&Slapd::person_ldif(
        "adal",
        "Ada Lovelace",
        "Lovelace",
        "ada@example.org",
        Some("Finance"),
    ));
    ldif.push_str(&Slapd::person_ldif(
        "zoe",
        "Zoë Ångström",
        "Ångström",
        "zoe@example.org",
        None,
    ));
    // More entries than the server's size limit (100): the sync must page.
    for i in 0..150 {
        ldif.push_str(&Slapd::person_ldif(
            &format!("bulk{i:03}"),
            &format!("Bulk Person {i:03}"),
            "Person",
            &format!("bulk{i:03}@example.org"),
            None,
        ));
    }
    slapd.add(&ldif);
    let (_dir, server, mut client) = start(&backend, &slapd, slapd.password_file()).await;

    let (progress, report) = sync(&mut client, "", true).await.unwrap();
    assert_eq!(
        (
            report.created,
            report.updated,
            report.disabled,
            report.unchanged
        ),
        (152, 0, 0, 0),
        "{report:?}"
    );
    let phases: Vec<&str> = progress.iter().map(|p| p.phase.as_str()).collect();
    for phase in ["connecting", "reading", "applying", "done"] {
        assert!(phases.contains(&phase), "{phase} missing from {phases:?}");
    }
    assert_eq!(progress.last().unwrap().entries_applied, 152);

    let ada = &search(&mut client, "lovelace").await[0];
    assert_eq!(ada.username, "adal");
    assert_eq!(ada.source, UserSource::Ldap as i32);
    assert_eq!(ada.org_unit, "people/Finance", "org unit from the DN");
    assert_eq!(
        ada.external_id.len(),
        36,
        "entryUUID: {:?}",
        ada.external_id
    );
    assert_eq!(search(&mut client, "angstrom").await[0].username, "zoe");

    // Idempotent.
    let (_, report) = sync(&mut client, "default", true).await.unwrap();
    assert_eq!(
        (
            report.created,
            report.updated,
            report.disabled,
            report.unchanged
        ),
        (0, 0, 0, 152),
        "{report:?}"
    );

    // A change and a removal in LDAP: one update, one disable.
    slapd.modify(&format!("dn: uid=adal,ou=Finance,ou=people,{SUFFIX}\nchangetype: modify\nreplace: mail\nmail: ada.king@example.org\n"));
    slapd.delete(&format!("uid=zoe,ou=people,{SUFFIX}"));
    let (_, report) = sync(&mut client, "", true).await.unwrap();
    assert_eq!(
        (
            report.created,
            report.updated,
            report.disabled,
            report.unchanged
        ),
        (0, 1, 1, 150),
        "{report:?}"
    );
    assert_eq!(
        search(&mut client, "lovelace").await[0].email,
        "ada.king@example.org"
    );
    assert_eq!(
        search(&mut client, "angstrom").await[0].status,
        UserStatus::Disabled as i32
    );

    // A user who comes back to LDAP is enabled again, and counted as updated.
    slapd.add(&Slapd::person_ldif(
        "zoe",
        "Zoë Ångström",
        "Ångström",
        "zoe@example.org",
        None,
    ));
    let (_, report) = sync(&mut client, "", true).await.unwrap();
    assert_eq!(
        (
            report.created,
            report.updated,
            report.disabled,
            report.unchanged
        ),
        (0, 1, 0, 151),
        "{report:?}"
    );
    assert_eq!(
        search(&mut client, "angstrom").await[0].status,
        UserStatus::Active as i32
    );

    // An attribute marks a user disabled (and its removal enables the user again).
    slapd.modify(&format!("dn: uid=bulk000,ou=people,{SUFFIX}\nchangetype: modify\nadd: employeeType\nemployeeType: Terminated\n"));
    let (_, report) = sync(&mut client, "marked", false).await.unwrap();
    assert_eq!((report.updated, report.unchanged), (1, 151), "{report:?}");
    assert_eq!(
        search(&mut client, "bulk000").await[0].status,
        UserStatus::Disabled as i32
    );
    slapd.modify(&format!(
        "dn: uid=bulk000,ou=people,{SUFFIX}\nchangetype: modify\ndelete: employeeType\n"
    ));
    let (_, report) = sync(&mut client, "marked", false).await.unwrap();
    assert_eq!(report.updated, 1, "{report:?}");
    assert_eq!(
        search(&mut client, "bulk000").await[0].status,
        UserStatus::Active as i32
    );

    // One bad entry is reported and skipped; the others are applied, and nobody is disabled
    // as missing (the bad entry may be someone still there).
    slapd.add(&Slapd::person_ldif(
        "broken",
        "Broken Mail",
        "Mail",
        "not-an-address",
        None,
    ));
    slapd.modify(&format!("dn: uid=adal,ou=Finance,ou=people,{SUFFIX}\nchangetype: modify\nreplace: cn\ncn: Ada King\n"));
    slapd.delete(&format!("uid=bulk001,ou=people,{SUFFIX}"));
    // With strict, the whole sync is refused and nothing changes.
    let err = sync(&mut client, "strict", true).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("uid=broken") && err.message().contains("email"),
        "{}",
        err.message()
    );
    assert_eq!(
        search(&mut client, "Ada King").await.len(),
        0,
        "nothing applied"
    );
    let (_, report) = sync(&mut client, "", true).await.unwrap();
    assert_eq!((report.updated, report.disabled), (1, 0), "{report:?}");
    assert_eq!(report.errors.len(), 2, "{report:?}");
    assert!(
        report.errors[0].message.contains("uid=broken") && report.errors[0].column == "email",
        "{report:?}"
    );
    assert!(
        report.errors[1]
            .message
            .contains("disable_missing was not applied")
    );
    assert_eq!(search(&mut client, "Ada King").await.len(), 1);
    assert_eq!(
        search(&mut client, "bulk001").await[0].status,
        UserStatus::Active as i32
    );

    // A CSV import does not silently take over a user that LDAP owns.
    let csv = "username,display_name,email\nadal,Ada CSV,ada.king@example.org\n";
    let err = import_csv(&mut client, csv, false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("line 2") && err.message().contains("synchronised from LDAP"),
        "{}",
        err.message()
    );
    let report = import_csv(&mut client, csv, true).await.unwrap();
    assert_eq!(report.updated, 1, "{report:?}");

    // An unreachable server is said to be unreachable.
    let err = sync(&mut client, "unreachable", false).await.unwrap_err();
    assert!(
        err.message().contains("could not connect"),
        "{}",
        err.message()
    );
    let err = sync(&mut client, "wrong-password", false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("bind"), "{}", err.message());
    assert!(!err.message().contains("not the password"));
    let err = sync(&mut client, "nope", false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("nope"));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_ldap_sync() {
    ldap_sync(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_ldap_sync() {
    ldap_sync(Backend::Postgres(Postgres::shared())).await;
}
