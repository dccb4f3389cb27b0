//! The template service over real mTLS, against SQLite and against a throwaway PostgreSQL:
//! versioning with optimistic concurrency, validation that names contradictory settings,
//! PIN checks that never echo the PIN, paging, and migrations that run once.

use cms_kit::client::Channel;
use cms_launcher::layout::Peers;
use cms_proto::common::v1::{CardProfile, PageRequest};
use cms_proto::template::v1::template_service_client::TemplateServiceClient;
use cms_proto::template::v1::*;
use cms_template::sample;
use cms_tests::inproc::{self, Running};
use cms_tests::pki::TestPki;
use cms_tests::postgres::{Backend, Postgres};
use tonic::Code;

struct Env {
    _dir: tempfile::TempDir,
    server: Running,
    client: TemplateServiceClient<Channel>,
    config: cms_template::Config,
}

async fn start(backend: &Backend) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let mut config: cms_template::Config =
        inproc::config(dir.path(), "template", &Peers::default());
    config.database = backend.database();
    let server = Running::start(config.clone(), cms_template::run).await;
    let channel = inproc::channel(pki.tls("gateway"), server.grpc, pki.id("template"));
    Env {
        _dir: dir,
        server,
        client: TemplateServiceClient::new(channel),
        config,
    }
}

async fn create(env: &mut Env, spec: TemplateSpec) -> Result<Template, tonic::Status> {
    env.client
        .create_template(CreateTemplateRequest {
            spec: Some(spec),
            change_comment: "initial".into(),
            auth: None,
        })
        .await
        .map(|r| r.into_inner().template.unwrap())
}

async fn update(
    env: &mut Env,
    id: &str,
    expected: u32,
    spec: TemplateSpec,
) -> Result<Template, tonic::Status> {
    env.client
        .update_template(UpdateTemplateRequest {
            id: id.into(),
            expected_current_version: expected,
            spec: Some(spec),
            change_comment: format!("edit of v{expected}"),
            auth: None,
        })
        .await
        .map(|r| r.into_inner().template.unwrap())
}

async fn versioning(backend: Backend) {
    let mut env = start(&backend).await;
    let t1 = create(&mut env, sample::minidriver("Employees"))
        .await
        .unwrap();
    assert_eq!((t1.version, t1.is_latest), (1, true));
    assert_eq!(t1.state, TemplateState::Active as i32);

    let mut spec = sample::minidriver("Employees");
    spec.pin_policy.as_mut().unwrap().min_length = 8;
    let t2 = update(&mut env, &t1.id, 1, spec.clone()).await.unwrap();
    assert_eq!((t2.id.as_str(), t2.version), (t1.id.as_str(), 2));

    // A stale editor loses, and is told the current version.
    let err = update(&mut env, &t1.id, 1, spec.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("version 2"), "{}", err.message());

    // Version 1 is immutable and still readable; the latest is 2.
    let old = env
        .client
        .get_template(GetTemplateRequest {
            id: t1.id.clone(),
            version: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .template
        .unwrap();
    assert_eq!(old.spec.unwrap().pin_policy.unwrap().min_length, 6);
    assert!(!old.is_latest);
    let versions = env
        .client
        .list_template_versions(ListTemplateVersionsRequest {
            id: t1.id.clone(),
            page: None,
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(
        versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        [2, 1]
    );
    assert_eq!(versions[0].change_comment, "edit of v1");

    // The card profile of a template never changes.
    let err = update(&mut env, &t1.id, 2, sample::piv("Employees"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("card_profile"), "{}", err.message());

    // The same content again is no new version: the answer is version 2.
    let same = update(&mut env, &t1.id, 2, spec.clone()).await.unwrap();
    assert_eq!(same.version, 2);
    assert_eq!(same.change_comment, "edit of v1");

    // Two concurrent editors of version 2: exactly one wins.
    spec.pin_policy.as_mut().unwrap().min_length = 7;
    let mut a = env.client.clone();
    let mut b = env.client.clone();
    let req = |comment: &str| UpdateTemplateRequest {
        id: t1.id.clone(),
        expected_current_version: 2,
        spec: Some(spec.clone()),
        change_comment: comment.into(),
        auth: None,
    };
    let (ra, rb) = tokio::join!(a.update_template(req("a")), b.update_template(req("b")));
    assert_eq!(
        [ra.is_ok(), rb.is_ok()].iter().filter(|ok| **ok).count(),
        1,
        "{ra:?} {rb:?}"
    );

    // Retired: still readable, no longer listed by default, no longer editable.
    let retired = env
        .client
        .retire_template(RetireTemplateRequest {
            id: t1.id.clone(),
            reason: "replaced".into(),
            auth: None,
        })
        .await
        .unwrap()
        .into_inner()
        .template
        .unwrap();
    assert_eq!(retired.state, TemplateState::Retired as i32);
    assert!(retired.retired_at.is_some());
    let err = update(&mut env, &t1.id, 3, spec).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let listed = env
        .client
        .list_templates(ListTemplatesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.templates.is_empty());
    let listed = env
        .client
        .list_templates(ListTemplatesRequest {
            include_retired: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.templates.len(), 1);
    env.server.stop().await.unwrap();
}

async fn validation(backend: Backend) {
    let mut env = start(&backend).await;
    let mut bad = sample::minidriver("Contradictory");
    {
        let p = bad.unblock_policy.as_mut().unwrap();
        p.challenge_response_enforced = true;
        p.online_unblock_allowed = true;
        let q = p
            .user_auth
            .as_mut()
            .unwrap()
            .security_questions
            .as_mut()
            .unwrap();
        q.required_correct = 4;
    }
    let err = create(&mut env, bad.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    for named in [
        "challenge_response_enforced",
        "online_unblock_allowed",
        "required_correct",
        "asked",
    ] {
        assert!(
            err.message().contains(named),
            "{named} not named: {}",
            err.message()
        );
    }
    // The structured detail names the first offending field.
    let detail = cms_kit::error_details::detail(&err).unwrap();
    assert!(detail.field.starts_with("unblock_policy"), "{detail:?}");
    // Dry run lists every violation, changes nothing.
    let checked = env
        .client
        .validate_policy(ValidatePolicyRequest { spec: Some(bad) })
        .await
        .unwrap()
        .into_inner();
    assert!(!checked.valid);
    assert!(
        checked
            .violations
            .iter()
            .any(|v| v.code == "CONTRADICTORY_FLOWS")
    );
    assert!(
        checked
            .violations
            .iter()
            .any(|v| v.code == "REQUIRED_CORRECT_EXCEEDS_ASKED")
    );
    let listed = env
        .client
        .list_templates(ListTemplatesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.templates.is_empty(), "a refused template was stored");

    // Oversized names are refused; names with quotes and SQL are stored verbatim.
    let err = create(&mut env, sample::minidriver(&"x".repeat(201)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("name has 201 characters"),
        "{}",
        err.message()
    );
    let sql = "Robert'); DROP TABLE templates;-- \"x\" 100%_";
    let t = create(&mut env, sample::minidriver(sql)).await.unwrap();
    assert_eq!(t.spec.as_ref().unwrap().name, sql);
    let found = env
        .client
        .list_templates(ListTemplatesRequest {
            name_contains: "drop table".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.templates.len(), 1);
    assert_eq!(found.templates[0].spec.as_ref().unwrap().name, sql);
    let none = env
        .client
        .list_templates(ListTemplatesRequest {
            name_contains: "0%".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.templates.len(), 1, "% must match literally");
    let none = env
        .client
        .list_templates(ListTemplatesRequest {
            name_contains: "1%".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.templates.is_empty(), "% must not be a wildcard");

    // Names are unique, case-insensitively.
    let err = create(&mut env, sample::minidriver(&sql.to_uppercase()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    // Unknown ids and versions.
    let err = env
        .client
        .get_template(GetTemplateRequest {
            id: "7a3c1d3e-0000-4000-8000-000000000000".into(),
            version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = env
        .client
        .get_template(GetTemplateRequest {
            id: t.id.clone(),
            version: 9,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = env
        .client
        .get_template(GetTemplateRequest {
            id: "'; SELECT 1 --".into(),
            version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    env.server.stop().await.unwrap();
}

async fn check_pin(backend: Backend) {
    let mut env = start(&backend).await;
    let t = create(&mut env, sample::minidriver("PINs")).await.unwrap();
    let check = |pin: &str, previous: &str| {
        let mut client = env.client.clone();
        let req = CheckPinRequest {
            template_id: t.id.clone(),
            template_version: 0,
            pin: pin.into(),
            previous_pin: previous.into(),
        };
        async move { client.check_pin(req).await.unwrap().into_inner() }
    };
    let ok = check("k7Rq2m", "").await;
    assert!(ok.acceptable && ok.violations.is_empty(), "{ok:?}");
    for (pin, previous, code) in [
        ("12345", "", "PIN_TOO_SHORT"),
        ("123456", "", "PIN_TRIVIAL"),
        ("777777", "", "PIN_TRIVIAL"),
        ("abcdeF", "", "PIN_MISSING_CLASS"),
        ("ab#d1x", "", "PIN_CHARACTER_NOT_ALLOWED"),
        ("k7Rq2m", "k7Rq2m", "PIN_SAME_AS_PREVIOUS"),
    ] {
        let r = check(pin, previous).await;
        assert!(!r.acceptable, "{pin}");
        assert!(r.violations.iter().any(|v| v.code == code), "{pin}: {r:?}");
        for v in &r.violations {
            assert!(!v.message.contains(pin), "the PIN is echoed: {}", v.message);
        }
    }
    // The Debug form of a CheckPin request (what a trace might print) hides the PIN.
    let debug = format!(
        "{:?}",
        CheckPinRequest {
            template_id: t.id.clone(),
            template_version: 0,
            pin: "k7Rq2m".into(),
            previous_pin: "x9Zz1a".into()
        }
    );
    assert!(
        !debug.contains("k7Rq2m") && !debug.contains("x9Zz1a"),
        "{debug}"
    );
    // A huge PIN is refused without being echoed.
    let huge = "9".repeat(10_000);
    let err = env
        .client
        .check_pin(CheckPinRequest {
            template_id: t.id.clone(),
            template_version: 0,
            pin: huge.clone(),
            previous_pin: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(!err.message().contains("99999"));
    env.server.stop().await.unwrap();
}

async fn paging(backend: Backend) {
    let mut env = start(&backend).await;
    let mut names = Vec::new();
    for i in 0..7 {
        let name = format!("Template {}", (b'G' - i) as char);
        names.push(name.clone());
        let spec = if i % 2 == 0 {
            sample::minidriver(&name)
        } else {
            sample::piv(&name)
        };
        create(&mut env, spec).await.unwrap();
    }
    names.sort();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = env
            .client
            .list_templates(ListTemplatesRequest {
                page: Some(PageRequest {
                    page_size: 3,
                    page_token: token.clone(),
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(
            page.templates
                .iter()
                .map(|t| t.spec.as_ref().unwrap().name.clone()),
        );
        token = page.page.unwrap().next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, names);
    let piv = env
        .client
        .list_templates(ListTemplatesRequest {
            card_profile: CardProfile::Piv as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(piv.templates.len(), 3);
    let err = env
        .client
        .list_templates(ListTemplatesRequest {
            page: Some(PageRequest {
                page_size: 3,
                page_token: "not-a-token".into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    env.server.stop().await.unwrap();
}

async fn migrations_run_once(backend: Backend) {
    let env = start(&backend).await;
    // Eight more "replicas" open the same database at once: the migration lock serialises
    // them and none applies a migration twice.
    let opens = (0..8).map(|_| {
        let config = env.config.clone();
        tokio::spawn(async move { cms_template::open_database(&config).await.map(drop) })
    });
    for open in futures_util::future::join_all(opens).await {
        open.unwrap().unwrap();
    }
    let db = cms_template::open_database(&env.config).await.unwrap();
    use sea_orm::ConnectionTrait;
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT version FROM seaql_migrations",
        ))
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    env.server.stop().await.unwrap();
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
    versioning,
    validation,
    check_pin,
    paging,
    migrations_run_once
);
