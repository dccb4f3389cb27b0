//! Custody's audit through its gRPC API, in-process on loopback listeners with real mTLS, on
//! an SQLite file and on a real PostgreSQL:
//!
//! * QueryAudit honours each of its filters, its order and its paging;
//! * ceremony steps, start-up, head exports and refused administrative calls are records,
//!   with their attributes; VerifyAudit answers its documented reason codes;
//! * a chain whose tail was cut off while custody was down is caught at start from the head
//!   custody keeps beside its database: custody then appends nothing and refuses key work.

use cms_cardcrypto::KeyAlgorithm;
use cms_kit::authz::IdentityPattern;
use cms_kit::client::Channel;
use cms_kit::pki::LeafSpec;
use cms_launcher::layout::Peers;
use cms_proto::common::v1::{
    ActorKind, AuthContext, DiversificationScheme, Flow, KeyAlgorithm as Alg, PageRequest,
};
use cms_proto::custody::v1::custody_service_client::CustodyServiceClient;
use cms_proto::custody::v1::*;
use cms_tests::custody::{import, kcv, proto_alg};
use cms_tests::inproc::{self, Running};
use cms_tests::pki::TestPki;
use cms_tests::postgres::{Backend, Postgres};
use tonic::Code;

type Client = CustodyServiceClient<Channel>;

/// A service with a scope at custody (every key) but no administrative right.
const REPORTS: &str = "service/reports";

struct Harness {
    dir: tempfile::TempDir,
    pki: TestPki,
    server: Running,
    gateway: Client,
    reports: Client,
}

fn config(dir: &std::path::Path, pki: &TestPki, backend: &Backend) -> cms_custody::Config {
    let mut config: cms_custody::Config = inproc::config(dir, "custody", &Peers::default());
    config.database = backend.database();
    let reports = IdentityPattern::Exact(pki.id(REPORTS));
    config.access.allow.push(reports.clone());
    config.callers.push(cms_custody::CallerScope {
        identity: reports,
        key_references: vec!["*".into()],
        admin: false,
        release_puk: false,
    });
    config
}

async fn custody(backend: &Backend) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let server = Running::start(config(dir.path(), &pki, backend), cms_custody::run).await;
    let (gateway, reports) = clients(&pki, &server);
    Harness {
        dir,
        pki,
        server,
        gateway,
        reports,
    }
}

fn clients(pki: &TestPki, server: &Running) -> (Client, Client) {
    let connect =
        |tls| CustodyServiceClient::new(inproc::channel(tls, server.grpc, pki.id("custody")));
    (
        connect(pki.tls("gateway")),
        connect(pki.issue("service-reports", &LeafSpec::new(pki.id(REPORTS), 30))),
    )
}

fn auth(actor: &str, user: &str, request: &str) -> Option<AuthContext> {
    Some(AuthContext {
        actor_kind: ActorKind::Operator as i32,
        actor_id: actor.into(),
        on_behalf_of_user_id: user.into(),
        flow: Flow::OfflineHelpdesk as i32,
        request_id: request.into(),
        ..Default::default()
    })
}

fn cryptogram(card: &[u8], challenge: u8, auth: Option<AuthContext>) -> ComputeCryptogramRequest {
    ComputeCryptogramRequest {
        card_id: card.to_vec(),
        challenge: vec![challenge; 16],
        master_key_reference: "mk".into(),
        master_key_version: 1,
        scheme: DiversificationScheme::Sp800108Cmac as i32,
        admin_key_algorithm: Alg::Aes128 as i32,
        auth,
        challenge_code: None,
    }
}

async fn query(client: &mut Client, req: QueryAuditRequest) -> QueryAuditResponse {
    client.query_audit(req).await.unwrap().into_inner()
}

fn seqs(response: &QueryAuditResponse) -> Vec<u64> {
    response.records.iter().map(|r| r.sequence).collect()
}

/// Every record, oldest first, a page at a time.
async fn all_records(client: &mut Client) -> Vec<AuditRecord> {
    let mut records = Vec::new();
    let mut token = String::new();
    loop {
        let page = query(
            client,
            QueryAuditRequest {
                page: Some(PageRequest {
                    page_size: 1000,
                    page_token: token,
                }),
                ..Default::default()
            },
        )
        .await;
        records.extend(page.records);
        token = page.page.unwrap_or_default().next_page_token;
        if token.is_empty() {
            return records;
        }
    }
}

async fn query_filters(backend: Backend) {
    let mut h = custody(&backend).await;
    let gw = &mut h.gateway;
    import(gw, "mk", KeyAlgorithm::Aes128, &[0x42; 16]).await;
    // Cryptograms by two operators for two users' cards, and one refused (unknown version).
    let asked = [
        (b"card-a".as_slice(), 1, auth("op-1", "user-a", "req-a1")),
        (b"card-a".as_slice(), 2, auth("op-2", "user-a", "req-a2")),
        (b"card-b".as_slice(), 1, auth("op-1", "user-b", "req-b1")),
    ];
    for (card, challenge, auth) in asked {
        gw.compute_cryptogram(cryptogram(card, challenge, auth))
            .await
            .unwrap();
    }
    let refused = ComputeCryptogramRequest {
        master_key_version: 9,
        ..cryptogram(b"card-b", 3, auth("op-2", "user-b", "req-b2"))
    };
    gw.compute_cryptogram(refused).await.unwrap_err();
    let everything = all_records(gw).await;
    let matching = |keep: &dyn Fn(&AuditRecord) -> bool| -> Vec<u64> {
        everything
            .iter()
            .filter(|r| keep(r))
            .map(|r| r.sequence)
            .collect()
    };
    let ctx = |r: &AuditRecord| r.context.clone().unwrap_or_default();
    let backend = backend.name();

    let by_request = query(
        gw,
        QueryAuditRequest {
            request_id: "req-a2".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_request.records.len(), 1, "{backend}");
    assert_eq!(ctx(&by_request.records[0]).request_id, "req-a2");

    let cryptograms = query(
        gw,
        QueryAuditRequest {
            events: vec![AuditEvent::Cryptogram as i32],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(seqs(&cryptograms).len(), 4, "{backend}");
    assert_eq!(
        seqs(&cryptograms),
        matching(&|r| r.event == AuditEvent::Cryptogram as i32)
    );
    let two_kinds = query(
        gw,
        QueryAuditRequest {
            events: vec![
                AuditEvent::Cryptogram as i32,
                AuditEvent::MasterKeyImport as i32,
            ],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        seqs(&two_kinds),
        matching(&|r| r.event == AuditEvent::Cryptogram as i32
            || r.event == AuditEvent::MasterKeyImport as i32)
    );
    assert!(seqs(&two_kinds).len() > 4);

    let refusals = query(
        gw,
        QueryAuditRequest {
            outcome: AuditOutcome::Refused as i32,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        seqs(&refusals),
        matching(&|r| r.outcome == AuditOutcome::Refused as i32)
    );
    assert_eq!(ctx(&refusals.records[0]).request_id, "req-b2", "{backend}");

    let card_b = query(
        gw,
        QueryAuditRequest {
            card_id: b"card-b".to_vec(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(seqs(&card_b).len(), 2, "{backend}");
    let op_1 = query(
        gw,
        QueryAuditRequest {
            actor_id: "op-1".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(seqs(&op_1), matching(&|r| ctx(r).actor_id == "op-1"));
    assert_eq!(seqs(&op_1).len(), 2);
    let user_a_by_op_2 = query(
        gw,
        QueryAuditRequest {
            user_id: "user-a".into(),
            actor_id: "op-2".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(seqs(&user_a_by_op_2).len(), 1, "filters combine");

    // Order, from_sequence and paging.
    let all: Vec<u64> = everything.iter().map(|r| r.sequence).collect();
    let newest_first = query(
        gw,
        QueryAuditRequest {
            descending: true,
            ..Default::default()
        },
    )
    .await;
    let mut reversed = all.clone();
    reversed.reverse();
    assert_eq!(seqs(&newest_first), reversed, "{backend}");
    let from_5 = query(
        gw,
        QueryAuditRequest {
            from_sequence: 5,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(seqs(&from_5), all[4..].to_vec());
    for descending in [false, true] {
        let mut paged = Vec::new();
        let mut token = String::new();
        loop {
            let page = query(
                gw,
                QueryAuditRequest {
                    descending,
                    page: Some(PageRequest {
                        page_size: 3,
                        page_token: token,
                    }),
                    ..Default::default()
                },
            )
            .await;
            assert!(page.records.len() <= 3);
            paged.extend(seqs(&page));
            token = page.page.unwrap().next_page_token;
            if token.is_empty() {
                break;
            }
        }
        let expected = if descending { &reversed } else { &all };
        assert_eq!(&paged, expected, "{backend} descending={descending}");
    }
    let err = gw
        .query_audit(QueryAuditRequest {
            outcome: 77,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn query_audit_honours_its_filters_order_and_paging_on_sqlite() {
    query_filters(Backend::Sqlite).await;
}

#[tokio::test]
async fn query_audit_honours_its_filters_order_and_paging_on_postgres() {
    query_filters(Backend::Postgres(Postgres::shared())).await;
}

fn attr<'a>(record: &'a AuditRecord, key: &str) -> &'a str {
    record.attributes.get(key).map_or("", String::as_str)
}

#[tokio::test]
async fn ceremony_steps_startup_exports_and_refused_admin_calls_are_records() {
    let mut h = custody(&Backend::Sqlite).await;
    let reports_id = h.pki.id(REPORTS).to_string();
    let gw = &mut h.gateway;
    let alg = KeyAlgorithm::Aes128;
    let key = [0x24u8; 16];
    let first = [0x11u8; 16];
    let second: Vec<u8> = key.iter().zip(&first).map(|(k, c)| k ^ c).collect();

    // A ceremony: begin, a component with a wrong KCV, two good ones, finish.
    let begun = gw
        .begin_key_import(BeginKeyImportRequest {
            reference: "ceremony".into(),
            algorithm: proto_alg(alg) as i32,
            component_count: 2,
            auth: auth("custodian-1", "", "req-begin"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let component = |value: &[u8], expected_kcv: String| AddKeyComponentRequest {
        import_id: begun.import_id.clone(),
        component: value.to_vec(),
        expected_kcv,
        custodian_label: "custodian-1".into(),
        auth: auth("custodian-1", "", "req-component"),
    };
    let err = gw
        .add_key_component(component(&first, kcv(alg, &second)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    for value in [first.as_slice(), second.as_slice()] {
        gw.add_key_component(component(value, kcv(alg, value)))
            .await
            .unwrap();
    }
    gw.finish_key_import(FinishKeyImportRequest {
        import_id: begun.import_id.clone(),
        expected_kcv: kcv(alg, &key),
        auth: auth("custodian-1", "", "req-finish"),
    })
    .await
    .unwrap();
    // Another ceremony, aborted.
    let aborted = gw
        .begin_key_import(BeginKeyImportRequest {
            reference: "abandoned".into(),
            algorithm: proto_alg(alg) as i32,
            component_count: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    gw.abort_key_import(AbortKeyImportRequest {
        import_id: aborted.import_id.clone(),
        reason: "custodian 3 is ill".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // The head is exported.
    let exported = gw
        .export_audit_head(ExportAuditHeadRequest {
            auth: auth("auditor-1", "", "req-export"),
        })
        .await
        .unwrap()
        .into_inner()
        .head
        .unwrap();
    // Administrative calls refused: no admin right, and a bad argument from an admin.
    let err = h
        .reports
        .generate_master_key(GenerateMasterKeyRequest {
            reference: "rogue".into(),
            algorithm: Alg::Aes128 as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    h.reports
        .query_audit(QueryAuditRequest::default())
        .await
        .unwrap_err();
    h.reports
        .export_audit_head(ExportAuditHeadRequest::default())
        .await
        .unwrap_err();
    let err = gw
        .retire_master_key_version(RetireMasterKeyVersionRequest {
            reference: "no-such-key".into(),
            version: 1,
            auth: auth("admin-1", "", "req-retire"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let records = all_records(gw).await;
    let startup = records
        .iter()
        .find(|r| r.event == AuditEvent::Startup as i32)
        .expect("a start-up record");
    assert_eq!(startup.outcome, AuditOutcome::Success as i32);
    assert_eq!(attr(startup, "self_test"), "passed");
    assert_eq!(attr(startup, "backend"), "soft");

    let steps: Vec<(&str, &str, &str, i32)> = records
        .iter()
        .filter(|r| {
            r.event == AuditEvent::MasterKeyImport as i32
                && (attr(r, "import_id") == begun.import_id || attr(r, "step") == "finish")
        })
        .map(|r| {
            (
                attr(r, "step"),
                attr(r, "component"),
                attr(r, "kcv_outcome"),
                r.outcome,
            )
        })
        .collect();
    let (ok, refused) = (AuditOutcome::Success as i32, AuditOutcome::Refused as i32);
    assert_eq!(
        steps,
        vec![
            ("begin", "", "", ok),
            ("component", "1 of 2", "mismatched", refused),
            ("component", "1 of 2", "matched", ok),
            ("component", "2 of 2", "matched", ok),
            ("finish", "", "", ok),
        ],
        "{records:#?}"
    );
    let finish = records
        .iter()
        .find(|r| attr(r, "step") == "finish")
        .unwrap();
    assert_eq!(
        (
            finish.master_key_reference.as_str(),
            finish.master_key_version
        ),
        ("ceremony", begun.version)
    );
    assert_eq!(
        (
            attr(finish, "algorithm"),
            attr(finish, "kcv"),
            attr(finish, "origin")
        ),
        ("aes-128", kcv(alg, &key).as_str(), "imported")
    );
    let begin = records.iter().find(|r| attr(r, "step") == "begin").unwrap();
    assert_eq!(begin.context.as_ref().unwrap().request_id, "req-begin");
    assert_eq!(begin.master_key_reference, "ceremony");
    let abort = records
        .iter()
        .find(|r| attr(r, "step") == "abort")
        .expect("an abort record");
    assert_eq!(
        (abort.master_key_reference.as_str(), abort.reason.as_str()),
        ("abandoned", "custodian 3 is ill")
    );

    let export = records
        .iter()
        .find(|r| r.event == AuditEvent::AuditHeadExport as i32 && r.outcome == ok)
        .expect("an export record");
    assert_eq!(attr(export, "head_sequence"), exported.sequence.to_string());
    assert_eq!(export.context.as_ref().unwrap().request_id, "req-export");

    let refused_by = |event: AuditEvent, rpc: &str| {
        records
            .iter()
            .find(|r| r.event == event as i32 && r.outcome == refused && attr(r, "rpc") == rpc)
    };
    let rogue = refused_by(AuditEvent::MasterKeyGenerate, "GenerateMasterKey")
        .expect("the refused GenerateMasterKey is a record");
    assert_eq!(rogue.caller_identity, reports_id);
    assert!(refused_by(AuditEvent::AuditRead, "QueryAudit").is_some());
    assert!(refused_by(AuditEvent::AuditHeadExport, "ExportAuditHead").is_some());
    let retire = refused_by(AuditEvent::MasterKeyRetire, "RetireMasterKeyVersion")
        .expect("the refused retirement is a record");
    assert_eq!(retire.context.as_ref().unwrap().request_id, "req-retire");
    assert!(retire.reason.contains("no-such-key"), "{}", retire.reason);

    let verdict = gw
        .verify_audit(VerifyAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(verdict.ok && verdict.reason.is_empty(), "{verdict:?}");
    h.server.stop().await.unwrap();
}

/// Runs `statement` on custody's SQLite file, behind its back.
async fn tamper(dir: &std::path::Path, statement: &str) {
    use sea_orm::ConnectionTrait;
    let path = dir.join("custody").join("custody.sqlite3");
    let db = sea_orm::Database::connect(format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    db.execute_unprepared(statement).await.unwrap();
    db.close().await.unwrap();
}

async fn verdict(client: &mut Client, expected_head: Option<AuditHead>) -> VerifyAuditResponse {
    client
        .verify_audit(VerifyAuditRequest {
            expected_head,
            from_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn verify_audit_answers_its_documented_reason_codes() {
    let mut h = custody(&Backend::Sqlite).await;
    let gw = &mut h.gateway;
    import(gw, "mk", KeyAlgorithm::Aes128, &[0x42; 16]).await;
    let head = gw
        .export_audit_head(ExportAuditHeadRequest::default())
        .await
        .unwrap()
        .into_inner()
        .head
        .unwrap();
    // Another head than the chain has at that sequence.
    let forged = AuditHead {
        hash: vec![0xAB; 32],
        ..head.clone()
    };
    let v = verdict(gw, Some(forged)).await;
    assert_eq!((v.ok, v.reason.as_str()), (false, "HEAD_MISMATCH"), "{v:?}");
    assert!(!v.detail.is_empty());
    // A changed record.
    tamper(
        h.dir.path(),
        "UPDATE audit_record SET reason = 'nothing' WHERE seq = 2",
    )
    .await;
    let v = verdict(gw, None).await;
    assert_eq!(
        (v.reason.as_str(), v.first_bad_sequence),
        ("HASH_MISMATCH", 2),
        "{v:?}"
    );
    // A missing record.
    tamper(h.dir.path(), "DELETE FROM audit_record WHERE seq <= 2").await;
    let v = verdict(gw, None).await;
    assert_eq!(
        (v.reason.as_str(), v.first_bad_sequence),
        ("SEQUENCE_GAP", 1)
    );
    // A cut tail, against the exported head.
    let mut fresh = custody(&Backend::Sqlite).await;
    import(&mut fresh.gateway, "mk", KeyAlgorithm::Aes128, &[0x42; 16]).await;
    let head = fresh
        .gateway
        .export_audit_head(ExportAuditHeadRequest::default())
        .await
        .unwrap()
        .into_inner()
        .head
        .unwrap();
    tamper(fresh.dir.path(), "DELETE FROM audit_record WHERE seq >= 3").await;
    let v = verdict(&mut fresh.gateway, Some(head)).await;
    assert_eq!(
        (v.reason.as_str(), v.first_bad_sequence),
        ("HEAD_MISSING", 3)
    );
    fresh.server.stop().await.unwrap();
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_tail_cut_off_while_custody_was_down_is_caught_at_start() {
    let h = custody(&Backend::Sqlite).await;
    let Harness {
        dir,
        pki,
        server,
        mut gateway,
        ..
    } = h;
    import(&mut gateway, "mk", KeyAlgorithm::Aes128, &[0x42; 16]).await;
    for challenge in 1..=3 {
        gateway
            .compute_cryptogram(cryptogram(b"card", challenge, auth("op", "u", "r")))
            .await
            .unwrap();
    }
    let last = gateway
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .audit_head
        .unwrap()
        .sequence;
    server.stop().await.unwrap();
    drop(gateway);
    // The last two records go while custody is down: the rest is a consistent chain.
    tamper(
        dir.path(),
        &format!("DELETE FROM audit_record WHERE seq > {}", last - 2),
    )
    .await;

    let server = Running::start(config(dir.path(), &pki, &Backend::Sqlite), cms_custody::run).await;
    let (mut gateway, _) = clients(&pki, &server);
    let status = gateway
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.seal_state, SealState::Error as i32, "{status:?}");
    assert!(status.detail.contains("truncated"), "{}", status.detail);
    // Nothing was appended (no re-used sequence number), and no key work is done.
    assert_eq!(status.audit_head.unwrap().sequence, last - 2);
    let err = gateway
        .compute_cryptogram(cryptogram(b"card", 9, auth("op", "u", "r")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    gateway
        .export_audit_head(ExportAuditHeadRequest::default())
        .await
        .unwrap_err();
    // The audit can still be read and verified, to see what happened.
    let verdict = gateway
        .verify_audit(VerifyAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(verdict.ok, "the remaining chain is consistent in itself");
    assert_eq!(all_records(&mut gateway).await.len() as u64, last - 2);
    server.stop().await.unwrap();
}
