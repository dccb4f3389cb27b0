//! The directory service over real mTLS, against SQLite and a throwaway PostgreSQL, with the
//! template service beside it (unknown templates are refused): users, helpdesk search,
//! credentials, operators, self-service enrolment with secrets kept out of storage and
//! answers, CSV import.

use cms_kit::authz::IdentityPattern;
use cms_kit::client::{Channel, UpstreamSettings};
use cms_launcher::layout::Peers;
use cms_proto::common::v1::{AuthContext, CardProfile, Flow, PageRequest, TotpAlgorithm};
use cms_proto::directory::v1::directory_service_client::DirectoryServiceClient;
use cms_proto::directory::v1::*;
use cms_proto::template::v1::template_service_client::TemplateServiceClient;
use cms_proto::template::v1::{CreateTemplateRequest, RetireTemplateRequest};
use cms_tests::inproc::{self, Running};
use cms_tests::pki::TestPki;
use cms_tests::postgres::{Backend, Postgres};
use sea_orm::ConnectionTrait;
use tonic::Code;

struct Env {
    _dir: tempfile::TempDir,
    template: Running,
    directory: Running,
    dir_config: cms_directory::Config,
    client: DirectoryServiceClient<Channel>,
    templates: TemplateServiceClient<Channel>,
}

async fn start(backend: &Backend) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let mut t_config: cms_template::Config =
        inproc::config(dir.path(), "template", &Peers::default());
    t_config.database = backend.database();
    t_config
        .access
        .allow
        .push(IdentityPattern::Exact(pki.id("directory")));
    let template = Running::start(t_config, cms_template::run).await;
    let mut config: cms_directory::Config =
        inproc::config(dir.path(), "directory", &Peers::default());
    config.database = backend.database();
    config.template = Some(UpstreamSettings {
        address: template.grpc.to_string(),
        identity: pki.id("template"),
        connect_timeout_ms: 2_000,
    });
    // Cheap argon2 for debug builds; the stored hash records its parameters.
    config.self_service.argon2_memory_kib = 256;
    config.self_service.argon2_iterations = 1;
    config.self_service.max_failed_attempts = 3;
    let directory = Running::start(config.clone(), cms_directory::run).await;
    let client = DirectoryServiceClient::new(inproc::channel(
        pki.tls("gateway"),
        directory.grpc,
        pki.id("directory"),
    ));
    let templates = TemplateServiceClient::new(inproc::channel(
        pki.tls("gateway"),
        template.grpc,
        pki.id("template"),
    ));
    Env {
        _dir: dir,
        template,
        directory,
        dir_config: config,
        client,
        templates,
    }
}

impl Env {
    async fn stop(self) {
        self.directory.stop().await.unwrap();
        self.template.stop().await.unwrap();
    }

    async fn user(&mut self, username: &str, display: &str, email: &str) -> User {
        self.client
            .create_user(CreateUserRequest {
                user: Some(User {
                    username: username.into(),
                    display_name: display.into(),
                    email: email.into(),
                    org_unit: "Staff".into(),
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

    async fn template(&mut self, name: &str) -> String {
        self.templates
            .create_template(CreateTemplateRequest {
                spec: Some(cms_template::sample::minidriver(name)),
                change_comment: String::new(),
                auth: None,
            })
            .await
            .unwrap()
            .into_inner()
            .template
            .unwrap()
            .id
    }

    async fn card(
        &mut self,
        user: &str,
        template: &str,
        card_id: &[u8],
        serial: &str,
    ) -> Result<Credential, tonic::Status> {
        self.client
            .register_credential(RegisterCredentialRequest {
                credential: Some(Credential {
                    user_id: user.into(),
                    card_id: card_id.to_vec(),
                    serial: serial.into(),
                    atr: vec![0x3b, 0x8f],
                    profile: CardProfile::Minidriver as i32,
                    template_id: template.into(),
                    template_version: 1,
                    master_key_version: 1,
                    ..Default::default()
                }),
                auth: None,
            })
            .await
            .map(|r| r.into_inner().credential.unwrap())
    }

    async fn search(&mut self, query: &str) -> Vec<UserSearchResult> {
        self.client
            .search_users(SearchUsersRequest {
                query: query.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .results
    }

    /// Every text stored in the directory database, for secret-leak checks.
    async fn dump_database(&self) -> String {
        let db = cms_directory::open_database(&self.dir_config)
            .await
            .unwrap();
        let mut out = String::new();
        for table in ["users", "security_questions", "credentials", "operators"] {
            let rows = db
                .query_all_raw(sea_orm::Statement::from_string(
                    db.get_database_backend(),
                    format!("SELECT * FROM {table}"),
                ))
                .await
                .unwrap();
            out.push_str(&format!("{rows:?}"));
        }
        out
    }
}

fn names(results: &[UserSearchResult]) -> Vec<String> {
    results
        .iter()
        .map(|r| r.user.as_ref().unwrap().username.clone())
        .collect()
}

async fn users(backend: Backend) {
    let mut env = start(&backend).await;
    let jane = env.user("jdoe", "Jane Doe", "jane.doe@example.com").await;
    assert_eq!(jane.status, UserStatus::Active as i32);
    assert_eq!(jane.source, UserSource::Local as i32);

    // Usernames are unique case- and accent-insensitively.
    let err = env
        .client
        .create_user(CreateUserRequest {
            user: Some(User {
                username: "JDÖE".into(),
                ..Default::default()
            }),
            auth: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("JDÖE"), "{}", err.message());

    // Oversized strings and malformed fields name the field.
    for (user, field) in [
        (
            User {
                username: "x".repeat(129),
                ..Default::default()
            },
            "user.username",
        ),
        (
            User {
                username: "ok1".into(),
                display_name: "d".repeat(257),
                ..Default::default()
            },
            "user.display_name",
        ),
        (
            User {
                username: "ok2".into(),
                email: "no-at-sign".into(),
                ..Default::default()
            },
            "user.email",
        ),
        (
            User {
                username: "ok3".into(),
                phone: "12ab".into(),
                ..Default::default()
            },
            "user.phone",
        ),
        (
            User {
                username: String::new(),
                ..Default::default()
            },
            "user.username",
        ),
        (
            User {
                username: "tab\there".into(),
                ..Default::default()
            },
            "user.username",
        ),
    ] {
        let err = env
            .client
            .create_user(CreateUserRequest {
                user: Some(user),
                auth: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }

    // Quotes and SQL in names are stored verbatim.
    let sql = "o'brien'); DROP TABLE users;--";
    let bobby = env
        .user(sql, "Robert \"Bobby\" Tables; DELETE FROM users", "")
        .await;
    let got = env
        .client
        .get_user(GetUserRequest {
            id: bobby.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(got.username, sql);
    assert_eq!(
        got.display_name,
        "Robert \"Bobby\" Tables; DELETE FROM users"
    );
    assert_eq!(names(&env.search("drop table").await), [sql]);
    assert_eq!(env.search("'").await.len(), 1);
    assert_eq!(names(&env.search("%").await), Vec::<String>::new());

    // Updates: masks, etags, phone normalisation.
    let mask = |paths: &[&str]| {
        Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        })
    };
    let updated = env
        .client
        .update_user(UpdateUserRequest {
            user: Some(User {
                id: jane.id.clone(),
                etag: jane.etag.clone(),
                phone: "+44 20 7946 0000".into(),
                email: "ignored@example.com".into(),
                ..Default::default()
            }),
            update_mask: mask(&["phone"]),
            auth: None,
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(updated.phone, "+442079460000");
    assert_eq!(updated.email, "jane.doe@example.com");
    assert_ne!(updated.etag, jane.etag);
    let err = env
        .client
        .update_user(UpdateUserRequest {
            user: Some(User {
                id: jane.id.clone(),
                etag: jane.etag.clone(),
                phone: "+4930123456".into(),
                ..Default::default()
            }),
            update_mask: mask(&["phone"]),
            auth: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "stale etag: {err:?}");
    let err = env
        .client
        .update_user(UpdateUserRequest {
            user: Some(User {
                id: jane.id.clone(),
                ..Default::default()
            }),
            update_mask: mask(&["shoe_size"]),
            auth: None,
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("shoe_size"), "{}", err.message());

    let disabled = env
        .client
        .disable_user(DisableUserRequest {
            id: jane.id.clone(),
            reason: "left".into(),
            auth: None,
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(disabled.status, UserStatus::Disabled as i32);
    let err = env
        .client
        .get_user(GetUserRequest {
            id: "5f0e3c1a-0000-4000-8000-000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    env.stop().await;
}

async fn search(backend: Backend) {
    let mut env = start(&backend).await;
    let t = env.template("Cards").await;
    let zoe = env
        .user("zaberg", "Zoë Åberg", "zoe.aberg@example.com")
        .await;
    let jane = env.user("jdoe", "Jane Doe", "jane.doe@example.com").await;
    env.user("jsmith", "John Smith", "john.smith@example.org")
        .await;
    env.user("aschmidt", "Anna Schmidt", "anna@schmidt.example")
        .await;
    env.user("doerte", "Dörte Müller", "doerte@example.com")
        .await;
    env.card(&jane.id, &t, b"card-1", "SN-0001-AB")
        .await
        .unwrap();
    env.card(&jane.id, &t, b"card-2", "SN-0002-CD")
        .await
        .unwrap();

    // Case- and accent-insensitive, both ways.
    assert_eq!(names(&env.search("aberg").await), ["zaberg"]);
    assert_eq!(names(&env.search("ZOË").await), ["zaberg"]);
    assert_eq!(names(&env.search("muller").await), ["doerte"]);
    // Prefix matches of any word come first, then substrings; each in name order.
    let r = env.search("doe").await;
    assert_eq!(names(&r), ["doerte", "jdoe"], "{r:?}");
    assert!(r[0].prefix_match && r[1].prefix_match);
    assert!(
        r[1].matched_fields
            .contains(&(MatchField::DisplayName as i32))
    );
    assert!(r[1].matched_fields.contains(&(MatchField::Email as i32)));
    let r = env.search("hmid").await;
    assert_eq!(names(&r), ["aschmidt"]);
    assert!(!r[0].prefix_match);
    // A prefix match ranks before a substring match that sorts earlier by name.
    env.user("zbernard", "Zyx Bernard", "").await;
    let r = env.search("ber").await;
    assert_eq!(names(&r), ["zbernard", "zaberg"]);
    assert!(r[0].prefix_match && !r[1].prefix_match);
    let r = env.search("smi").await;
    assert_eq!(names(&r), ["jsmith"]);
    assert!(r[0].prefix_match);
    // Email substring.
    let r = env.search("oe@exa").await;
    assert_eq!(names(&r), ["jdoe"]);
    assert!(!r[0].prefix_match);
    assert_eq!(r[0].matched_fields, [MatchField::Email as i32]);
    // Card serials: exact, without separators, substring.
    for q in ["SN-0002-CD", "sn0002cd", "0002"] {
        let r = env.search(q).await;
        assert_eq!(names(&r), ["jdoe"], "{q}");
        assert_eq!(r[0].credential_count, 2);
        assert_eq!(r[0].matched_fields, [MatchField::CardSerial as i32], "{q}");
        assert_eq!(r[0].matched_credentials.len(), 1, "{q}");
        assert_eq!(r[0].matched_credentials[0].serial, "SN-0002-CD");
    }
    // Two-letter queries work too.
    assert_eq!(names(&env.search("zo").await), ["zaberg"]);

    // Paging is stable even while users are added between pages.
    for i in 0..23 {
        env.user(&format!("pager{i:02}"), &format!("Pager {i:02}"), "")
            .await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let resp = env
            .client
            .search_users(SearchUsersRequest {
                query: "pager".into(),
                page: Some(PageRequest {
                    page_size: 10,
                    page_token: token.clone(),
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(names(&resp.results));
        pages += 1;
        if pages == 1 {
            env.user("pager00a", "Pager 00a", "").await; // sorts before the cursor: not seen
        }
        token = resp.page.unwrap().next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let expected: Vec<String> = (0..23).map(|i| format!("pager{i:02}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(pages, 3);

    // Filters: status and org unit (with sub-units).
    env.client
        .disable_user(DisableUserRequest {
            id: zoe.id.clone(),
            reason: String::new(),
            auth: None,
        })
        .await
        .unwrap();
    let r = env
        .client
        .search_users(SearchUsersRequest {
            statuses: vec![UserStatus::Disabled as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(names(&r), ["zaberg"]);
    for (username, ou) in [
        ("fin1", "Finance"),
        ("fin2", "Finance/Payroll"),
        ("fin3", "Financeteam"),
    ] {
        env.client
            .create_user(CreateUserRequest {
                user: Some(User {
                    username: username.into(),
                    display_name: username.into(),
                    org_unit: ou.into(),
                    ..Default::default()
                }),
                auth: None,
            })
            .await
            .unwrap();
    }
    let r = env
        .client
        .search_users(SearchUsersRequest {
            query: "fin".into(),
            org_units: vec!["Finance".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(names(&r), ["fin1", "fin2"]);
    let err = env
        .client
        .search_users(SearchUsersRequest {
            query: "x".repeat(300),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    env.stop().await;
}

async fn credentials(backend: Backend) {
    let mut env = start(&backend).await;
    let t = env.template("Employee cards").await;
    let jane = env.user("jdoe", "Jane Doe", "").await;

    let err = env
        .card(
            &jane.id,
            "1b4e28ba-2fa1-4d3b-9f1c-000000000000",
            b"c1",
            "S1",
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("unknown template"),
        "{}",
        err.message()
    );
    let err = env
        .card(&jane.id, "not-a-uuid", b"c1", "S1")
        .await
        .unwrap_err();
    assert!(
        err.message().contains("unknown template"),
        "{}",
        err.message()
    );

    let c = env.card(&jane.id, &t, b"c1", "S1").await.unwrap();
    assert_eq!(c.status, CredentialStatus::Active as i32);
    assert_eq!(
        (c.template_id.as_str(), c.template_version),
        (t.as_str(), 1)
    );
    let err = env.card(&jane.id, &t, b"c1", "S2").await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = env
        .card("1b4e28ba-2fa1-4d3b-9f1c-000000000000", &t, b"c9", "S9")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = env.card(&jane.id, &t, &[0u8; 65], "S9").await.unwrap_err();
    assert!(err.message().contains("card_id"), "{}", err.message());

    let by_card = env
        .client
        .get_credential_by_card_id(GetCredentialByCardIdRequest {
            card_id: b"c1".to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .credential
        .unwrap();
    assert_eq!(by_card.id, c.id);

    let unblocked = env
        .client
        .record_unblock(RecordUnblockRequest {
            id: c.id.clone(),
            unblocked_at: None,
            auth: Some(AuthContext {
                flow: Flow::OfflineHelpdesk as i32,
                ..Default::default()
            }),
            puk_version: 0,
            puk_rotation_pending: false,
        })
        .await
        .unwrap()
        .into_inner()
        .credential
        .unwrap();
    assert_eq!(unblocked.unblock_count, 1);
    assert_eq!(unblocked.last_unblock_flow, Flow::OfflineHelpdesk as i32);

    let lost = env
        .client
        .update_credential_status(UpdateCredentialStatusRequest {
            id: c.id.clone(),
            status: CredentialStatus::Revoked as i32,
            reason: "stolen".into(),
            auth: None,
        })
        .await
        .unwrap()
        .into_inner()
        .credential
        .unwrap();
    assert_eq!(lost.status_reason, "stolen");
    let err = env
        .client
        .update_credential_status(UpdateCredentialStatusRequest {
            id: c.id.clone(),
            status: CredentialStatus::Active as i32,
            reason: String::new(),
            auth: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let listed = env
        .client
        .list_user_credentials(ListUserCredentialsRequest {
            user_id: jane.id.clone(),
            include_inactive: false,
            page: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.credentials.is_empty());
    let listed = env
        .client
        .list_user_credentials(ListUserCredentialsRequest {
            user_id: jane.id.clone(),
            include_inactive: true,
            page: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.credentials.len(), 1);

    // No new cards under a retired template.
    env.templates
        .retire_template(RetireTemplateRequest {
            id: t.clone(),
            reason: String::new(),
            auth: None,
        })
        .await
        .unwrap();
    let err = env.card(&jane.id, &t, b"c2", "S2").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("retired"));
    env.stop().await;
}

async fn operators(backend: Backend) {
    let mut env = start(&backend).await;
    let t = env.template("Ops").await;
    let spki = vec![7u8; 32];
    let op = Operator {
        username: "helpdesk1".into(),
        display_name: "Help Desk".into(),
        roles: vec!["helpdesk".into(), "approver".into()],
        scope: Some(OperatorScope {
            org_units: vec!["Finance".into()],
            template_ids: vec![t.clone()],
        }),
        certificates: vec![
            CertificateBinding {
                binding: Some(certificate_binding::Binding::IssuerSerial(IssuerSerial {
                    issuer_dn: "CN=Ops CA".into(),
                    serial_number: vec![0, 0x12, 0x34],
                })),
                label: "card".into(),
                ..Default::default()
            },
            CertificateBinding {
                binding: Some(certificate_binding::Binding::SpkiSha256(spki.clone())),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let created = env
        .client
        .create_operator(CreateOperatorRequest {
            operator: Some(op.clone()),
            auth: None,
        })
        .await
        .unwrap()
        .into_inner()
        .operator
        .unwrap();
    assert_eq!(created.certificates.len(), 2);
    let found = env
        .client
        .get_operator_by_certificate(GetOperatorByCertificateRequest {
            issuer_dn: "CN=Ops CA".into(),
            serial_number: vec![0x12, 0x34],
            spki_sha256: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .operator
        .unwrap();
    assert_eq!(found.id, created.id);
    assert!(found.last_login_at.is_some());
    let found = env
        .client
        .get_operator_by_certificate(GetOperatorByCertificateRequest {
            issuer_dn: "CN=Other".into(),
            serial_number: vec![1],
            spki_sha256: spki.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .operator
        .unwrap();
    assert_eq!(found.id, created.id);

    // Duplicates, unknown templates, bad bindings.
    let mut dup = op.clone();
    dup.username = "helpdesk2".into();
    let err = env
        .client
        .create_operator(CreateOperatorRequest {
            operator: Some(dup),
            auth: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "binding reused: {err:?}");
    let mut dup = op.clone();
    dup.certificates.clear();
    let err = env
        .client
        .create_operator(CreateOperatorRequest {
            operator: Some(dup.clone()),
            auth: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "username reused: {err:?}");
    dup.username = "helpdesk3".into();
    dup.scope = Some(OperatorScope {
        org_units: vec![],
        template_ids: vec!["1b4e28ba-2fa1-4d3b-9f1c-000000000000".into()],
    });
    let err = env
        .client
        .create_operator(CreateOperatorRequest {
            operator: Some(dup.clone()),
            auth: None,
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("unknown template"),
        "{}",
        err.message()
    );
    dup.scope = None;
    dup.roles = vec!["Help Desk!".into()];
    let err = env
        .client
        .create_operator(CreateOperatorRequest {
            operator: Some(dup),
            auth: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let listed = env
        .client
        .list_operators(ListOperatorsRequest {
            role: "approver".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.operators.len(), 1);

    // Disabled operators are not found by certificate.
    let disabled = env
        .client
        .update_operator(UpdateOperatorRequest {
            operator: Some(Operator {
                id: created.id.clone(),
                etag: created.etag.clone(),
                status: OperatorStatus::Disabled as i32,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["status".into()],
            }),
            auth: None,
        })
        .await
        .unwrap()
        .into_inner()
        .operator
        .unwrap();
    assert_eq!(disabled.status, OperatorStatus::Disabled as i32);
    assert_eq!(disabled.roles, op.roles, "unmasked fields kept");
    let err = env
        .client
        .get_operator_by_certificate(GetOperatorByCertificateRequest {
            issuer_dn: String::new(),
            serial_number: vec![],
            spki_sha256: spki,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    env.stop().await;
}

fn base32_decode(s: &str) -> Vec<u8> {
    data_encoding::BASE32_NOPAD
        .decode(s.as_bytes())
        .expect("base32")
}

async fn enrolment(backend: Backend) {
    let mut env = start(&backend).await;
    let jane = env.user("jdoe", "Jane Doe", "").await;
    let answers = [
        "Rex the Dog",
        "Zürich",
        "St. Mary's School",
        "Blue",
        "Pizza",
    ];
    let questions: Vec<SecurityQuestionEnrolment> =
        ["Pet?", "Town?", "School?", "Colour?", "Food?"]
            .iter()
            .zip(answers)
            .map(|(q, a)| SecurityQuestionEnrolment {
                question: q.to_string(),
                answer: a.into(),
            })
            .collect();
    let too_few = env
        .client
        .enrol_security_questions(EnrolSecurityQuestionsRequest {
            user_id: jane.id.clone(),
            questions: questions[..2].to_vec(),
            min_enrolled: 3,
            min_answer_length: 3,
            auth: None,
        })
        .await
        .unwrap_err();
    assert_eq!(too_few.code(), Code::InvalidArgument);
    let short = env
        .client
        .enrol_security_questions(EnrolSecurityQuestionsRequest {
            user_id: jane.id.clone(),
            questions: vec![SecurityQuestionEnrolment {
                question: "Q?".into(),
                answer: "ab".into(),
            }],
            min_enrolled: 1,
            min_answer_length: 3,
            auth: None,
        })
        .await
        .unwrap_err();
    assert!(!short.message().contains("ab\""), "{}", short.message());
    let enrolled = env
        .client
        .enrol_security_questions(EnrolSecurityQuestionsRequest {
            user_id: jane.id.clone(),
            questions,
            min_enrolled: 3,
            min_answer_length: 3,
            auth: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(enrolled.questions.len(), 5);
    assert_eq!(enrolled.enrolment.unwrap().security_questions_enrolled, 5);

    let asked = env
        .client
        .get_security_questions(GetSecurityQuestionsRequest {
            user_id: jane.id.clone(),
            count: 3,
        })
        .await
        .unwrap()
        .into_inner()
        .questions;
    assert_eq!(asked.len(), 3);
    let answer_of = |q: &SecurityQuestion| {
        let i = enrolled
            .questions
            .iter()
            .position(|e| e.id == q.id)
            .unwrap();
        answers[i]
    };
    // Case, accents, spaces and punctuation do not matter.
    let variants = |q: &SecurityQuestion| {
        let a = answer_of(q)
            .to_uppercase()
            .replace('Ü', "U")
            .replace('.', "");
        SecurityAnswer {
            question_id: q.id.clone(),
            answer: format!("  {a} "),
        }
    };
    let shared = env.client.clone();
    let verify = |answers: Vec<SecurityAnswer>| {
        let mut client = shared.clone();
        let user_id = jane.id.clone();
        async move {
            client
                .verify_security_answers(VerifySecurityAnswersRequest {
                    user_id,
                    answers,
                    required_correct: 2,
                    auth: None,
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let ok = verify(asked.iter().map(variants).collect()).await;
    assert!(ok.verified, "{ok:?}");
    // Two of three right is enough; one of three is not.
    let mut two = asked.iter().map(variants).collect::<Vec<_>>();
    two[0].answer = "wrong".into();
    assert!(verify(two.clone()).await.verified);
    two[1].answer = "wrong too".into();
    let failed = verify(two.clone()).await;
    assert!(!failed.verified);
    assert_eq!(failed.attempts_remaining, 2);
    verify(two.clone()).await;
    let locked = verify(two.clone()).await;
    assert!(
        !locked.verified && locked.locked_until.is_some(),
        "{locked:?}"
    );
    // Locked: even right answers fail now, and the user shows as locked.
    assert!(!verify(asked.iter().map(variants).collect()).await.verified);
    let user = env
        .client
        .get_user(GetUserRequest {
            id: jane.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.status, UserStatus::Locked as i32);

    // TOTP for another user.
    let bob = env.user("bob", "Bob", "").await;
    let enrol = env
        .client
        .enrol_totp(EnrolTotpRequest {
            user_id: bob.id.clone(),
            issuer: "ACME CMS".into(),
            account_name: "bob@acme.example".into(),
            parameters: Some(TotpParameters {
                algorithm: TotpAlgorithm::Sha256 as i32,
                digits: 8,
                period_seconds: 30,
            }),
            auth: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(enrol.state, TotpState::Pending as i32);
    let uri = enrol.provisioning_uri.clone();
    assert!(
        uri.starts_with("otpauth://totp/ACME%20CMS:bob%40acme.example?secret="),
        "{uri}"
    );
    assert!(uri.contains("algorithm=SHA256&digits=8&period=30"), "{uri}");
    let secret_b32 = uri
        .split("secret=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_owned();
    let secret = base32_decode(&secret_b32);
    assert_eq!(secret.len(), 32);
    let params = cms_directory::secrets::TotpParams {
        alg: cms_directory::secrets::TotpAlg::Sha256,
        digits: 8,
        period: 30,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let code = params.code(&secret, now / 30);
    let verify_totp = |code: String, confirm: bool| {
        let mut client = shared.clone();
        let user_id = bob.id.clone();
        async move {
            client
                .verify_totp(VerifyTotpRequest {
                    user_id,
                    code,
                    confirm_enrolment: confirm,
                    allowed_skew_steps: 1,
                    auth: None,
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let err = env
        .client
        .verify_totp(VerifyTotpRequest {
            user_id: bob.id.clone(),
            code: code.clone(),
            confirm_enrolment: false,
            allowed_skew_steps: 1,
            auth: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "not yet confirmed: {err:?}"
    );
    assert!(!err.message().contains(&code));
    let confirmed = verify_totp(code.clone(), true).await;
    assert!(confirmed.verified, "{confirmed:?}");
    assert_eq!(confirmed.state, TotpState::Active as i32);
    // The same code again is a replay.
    assert!(!verify_totp(code.clone(), false).await.verified);
    let wrong = if code == "00000000" {
        "11111111"
    } else {
        "00000000"
    };
    let r = verify_totp(wrong.into(), false).await;
    assert!(!r.verified);
    assert_eq!(
        r.attempts_remaining, 1,
        "replay and wrong code both counted: {r:?}"
    );
    let user = env
        .client
        .get_user(GetUserRequest { id: bob.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.enrolment.unwrap().totp_state, TotpState::Active as i32);

    // Nothing secret is stored in clear: no answer, no TOTP secret.
    let dump = env.dump_database().await.to_lowercase();
    for a in answers {
        let folded = cms_directory::normalize::fold_answer(a);
        assert!(!dump.contains(&folded), "answer {a:?} stored in clear");
    }
    assert!(!dump.contains(&secret_b32.to_lowercase()));
    let secret_hex = data_encoding::HEXLOWER.encode(&secret);
    assert!(!dump.contains(&secret_hex));
    let secret_list = format!("{:?}", secret).replace(' ', "");
    assert!(
        !dump
            .replace(' ', "")
            .contains(&secret_list[1..secret_list.len() - 1])
    );
    env.stop().await;
}

async fn import_csv(backend: Backend) {
    let mut env = start(&backend).await;
    env.user("local1", "Local User", "").await;
    let shared = env.client.clone();
    let import = |csv: &[u8], options: ImportUsersOptions| {
        let mut client = shared.clone();
        let mut messages = vec![ImportUsersRequest {
            payload: Some(import_users_request::Payload::Options(options)),
            auth: None,
        }];
        // Split anywhere, even inside a UTF-8 sequence.
        for chunk in csv.chunks(7) {
            messages.push(ImportUsersRequest {
                payload: Some(import_users_request::Payload::CsvChunk(chunk.to_vec())),
                auth: None,
            });
        }
        async move {
            client
                .import_users(tokio_stream::iter(messages))
                .await
                .map(|r| r.into_inner().report.unwrap())
        }
    };
    let opts = |update: bool, disable: bool| ImportUsersOptions {
        update_existing: update,
        disable_missing: disable,
        dry_run: false,
        has_header: true,
        delimiter: String::new(),
        overwrite_ldap_users: false,
    };
    let csv = "username,display_name,email,phone,org_unit,external_id\n\
               ada,Ada Lovelace,ada@example.com,+441234567890,R&D,E1\n\
               \"o'neil\",\"O'Neil, \"\"Tip\"\"\",tip@example.com,,Politics,E2\n\
               zoe,Zoë Ångström,zoe@example.com,,R&D/Lab,E3\n";
    let r = import(csv.as_bytes(), opts(true, true)).await.unwrap();
    assert_eq!(
        (r.created, r.updated, r.disabled, r.unchanged),
        (3, 0, 0, 0),
        "{r:?}"
    );
    // Idempotent.
    let r = import(csv.as_bytes(), opts(true, true)).await.unwrap();
    assert_eq!(
        (r.created, r.updated, r.disabled, r.unchanged),
        (0, 0, 0, 3),
        "{r:?}"
    );
    assert_eq!(names(&env.search("angstrom").await), ["zoe"]);
    let tip = env.search("o'neil").await;
    assert_eq!(
        tip[0].user.as_ref().unwrap().display_name,
        "O'Neil, \"Tip\""
    );
    // Renamed by external id, one removed: updated 1, disabled 1 (local users untouched).
    let csv2 = "username,display_name,email,phone,org_unit,external_id\n\
                ada,Ada King,ada@example.com,+441234567890,R&D,E1\n\
                zoe2,Zoë Ångström,zoe@example.com,,R&D/Lab,E3\n";
    let dry = import(
        csv2.as_bytes(),
        ImportUsersOptions {
            dry_run: true,
            ..opts(true, true)
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (dry.created, dry.updated, dry.disabled, dry.dry_run),
        (0, 2, 1, true),
        "{dry:?}"
    );
    assert_eq!(
        names(&env.search("lovelace").await),
        ["ada"],
        "dry run changed nothing"
    );
    let r = import(csv2.as_bytes(), opts(true, true)).await.unwrap();
    assert_eq!(
        (r.created, r.updated, r.disabled, r.unchanged),
        (0, 2, 1, 0),
        "{r:?}"
    );
    assert_eq!(names(&env.search("ada king").await), ["ada"]);
    assert_eq!(names(&env.search("angstrom").await), ["zoe2"]);
    let local = env.search("local").await;
    assert_eq!(
        local[0].user.as_ref().unwrap().status,
        UserStatus::Active as i32
    );
    let before = env.search("").await.len();

    // Bad input changes nothing and says where.
    let bad_utf8 = b"username,display_name\nnew1,Fine\nnew2,Bad \xff\xfe here\n";
    let err = import(bad_utf8, opts(true, false)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("line 3") && err.message().contains("UTF-8"),
        "{}",
        err.message()
    );
    let err = import(b"username,shoe_size\nx,42\n", opts(true, false))
        .await
        .unwrap_err();
    assert!(err.message().contains("shoe_size"), "{}", err.message());
    let err = import(
        b"new1,New One\nnew2,New,Two,,,,\n",
        ImportUsersOptions {
            has_header: false,
            ..opts(true, false)
        },
    )
    .await
    .unwrap_err();
    assert!(
        err.message().contains("line 1") && err.message().contains("expected 6"),
        "{}",
        err.message()
    );
    let err = import(
        b"username,email\nnew1,a@example.com\nnew2,broken\nNEW1,b@example.com\n",
        opts(true, false),
    )
    .await
    .unwrap_err();
    assert!(
        err.message().contains("line 3, column email"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("line 4, column username: duplicate"),
        "{}",
        err.message()
    );
    assert_eq!(
        env.search("").await.len(),
        before,
        "a refused import wrote something"
    );
    assert!(env.search("new1").await.is_empty());

    // The progress variant streams events, then the report.
    let mut messages = vec![ImportUsersWithProgressRequest {
        payload: Some(import_users_with_progress_request::Payload::Options(opts(
            false, false,
        ))),
        auth: None,
    }];
    let mut big = String::from("username,display_name\n");
    for i in 0..2_500 {
        big.push_str(&format!("bulk{i:04},Bulk User {i}\n"));
    }
    messages.push(ImportUsersWithProgressRequest {
        payload: Some(import_users_with_progress_request::Payload::CsvChunk(
            big.into_bytes(),
        )),
        auth: None,
    });
    let mut stream = env
        .client
        .import_users_with_progress(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    let mut phases = Vec::new();
    let mut report = None;
    while let Some(event) = stream.message().await.unwrap() {
        match event.event.unwrap() {
            import_users_with_progress_response::Event::Progress(p) => {
                phases.push((p.phase, p.records_applied))
            }
            import_users_with_progress_response::Event::Report(r) => report = Some(r),
        }
    }
    let report = report.expect("a final report");
    assert_eq!(report.created, 2_500);
    assert!(
        phases
            .iter()
            .any(|(p, n)| p == "applying" && *n > 0 && *n < 2_500),
        "{phases:?}"
    );
    assert_eq!(phases.last().unwrap(), &("done".to_owned(), 2_500));
    env.stop().await;
}

async fn migrations_run_once(backend: Backend) {
    let env = start(&backend).await;
    let opens = (0..6).map(|_| {
        let config = env.dir_config.clone();
        tokio::spawn(async move { cms_directory::open_database(&config).await.map(drop) })
    });
    for open in futures_util::future::join_all(opens).await {
        open.unwrap().unwrap();
    }
    let db = cms_directory::open_database(&env.dir_config).await.unwrap();
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT version FROM seaql_migrations",
        ))
        .await
        .unwrap();
    // One row per migration: none ran twice, none was skipped.
    let expected = cms_directory::migration::count();
    assert!(expected >= 2, "{expected}");
    assert_eq!(rows.len(), expected);
    env.stop().await;
}

/// Walks every page of a search; returns the usernames and whether each was a prefix match.
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

/// The directory of `env`'s database, without its gRPC service.
async fn in_process(env: &Env) -> cms_directory::Directory {
    let db = cms_directory::open_database(&env.dir_config).await.unwrap();
    cms_directory::Directory::new(
        db,
        cms_directory::secrets::SecretKey::from_bytes(&[3; 32]),
        Default::default(),
    )
}

/// Dense queries (hundreds of matches) and sparse ones on the same data: every page in page
/// order, word-start matches first.
async fn dense_and_sparse_searches_agree(backend: Backend) {
    let env = start(&backend).await;
    let d = in_process(&env).await;
    // 600 "Pager" users (dense for "pager" and "ager"), a few sparse ones.
    for i in 0..600 {
        d.create_user(Some(User {
            username: format!("p{i:03}"),
            display_name: format!("Pager {:03}", (i * 7) % 600),
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    for (u, n) in [
        ("manager1", "Manager One"),
        ("wager", "Zed Wager"),
        ("pag", "Pagination Tester"),
        ("agerton", "Ann Agerton"),
    ] {
        d.create_user(Some(User {
            username: u.into(),
            display_name: n.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    let prefix = all_pages(&d, "pager", 50).await;
    assert_eq!(prefix.len(), 600);
    assert!(prefix.iter().all(|(_, p)| *p));
    let mut sorted = prefix.clone();
    sorted.sort_by_key(|(u, _)| {
        let i: usize = u[1..].parse().unwrap();
        (i * 7) % 600
    });
    assert_eq!(prefix, sorted, "pages in display-name order");
    // "ager": word-start matches (agerton) first, then the substrings, dense set included.
    let sub = all_pages(&d, "ager", 37).await;
    assert_eq!(sub.len(), 603, "{:?}", &sub[..3]);
    assert_eq!(sub[0], ("agerton".to_owned(), true));
    assert_eq!(sub[1], ("manager1".to_owned(), false));
    assert!(sub[2..602].iter().all(|(u, p)| u.starts_with('p') && !p));
    assert_eq!(sub[602], ("wager".to_owned(), false));
    // A sparse query on the same data.
    assert_eq!(
        all_pages(&d, "tester", 10).await,
        [("pag".to_owned(), true)]
    );
    assert_eq!(
        all_pages(&d, "one", 10).await,
        [("manager1".to_owned(), true)]
    );
    env.stop().await;
}

/// Searches whose first candidates are mostly not matches (the search then reads another list
/// and starts again where it was), and searches whose first tier finds few (the second reuses
/// its lists), find exactly the users whose text has the query: checked against every user.
async fn searches_find_exactly_the_matches(backend: Backend) {
    let env = start(&backend).await;
    let d = in_process(&env).await;
    let mut users: Vec<(String, String)> = Vec::new();
    for i in 0..40 {
        // "ph.s", "eph", "str" and "tro", but not "eph.stro"; first in page order.
        users.push((format!("joseph.sa{i:02}.strom"), format!("Joseph Aa{i:02}")));
    }
    for i in 0..12 {
        users.push((format!("joseph.strom{i:02}"), format!("Joseph Zz{i:02}")));
    }
    users.push(("serial.owner".into(), "Card Holder".into()));
    for (username, display_name) in &users {
        d.create_user(Some(User {
            username: username.clone(),
            display_name: display_name.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    for q in [
        "eph.stro", "joseph.s", "strom0", "a07.st", "h.sa1", "m11", "serial.o",
    ] {
        let mut found: Vec<String> = all_pages(&d, q, 7)
            .await
            .into_iter()
            .map(|(u, _)| u)
            .collect();
        let count = found.len();
        found.sort();
        found.dedup();
        assert_eq!(found.len(), count, "{q}: a user twice");
        let mut expected: Vec<String> = users
            .iter()
            .filter(|(u, n)| u.contains(q) || n.to_lowercase().contains(q))
            .map(|(u, _)| u.clone())
            .collect();
        expected.sort();
        assert_eq!(found, expected, "{q}");
    }
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
    users,
    search,
    dense_and_sparse_searches_agree,
    searches_find_exactly_the_matches,
    credentials,
    operators,
    enrolment,
    import_csv,
    migrations_run_once
);
