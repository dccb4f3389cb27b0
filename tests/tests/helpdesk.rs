//! The helpdesk at the gateway, end to end over mTLS with real processes (`cms serve …`): an
//! operator finds a user, types the challenge a card shows (a shared vector) and reads back
//! the vector's response; the refusals (checksum, role, scope, disabled operator, a template
//! without offline unblock) and dual control (approval by a second operator, single use,
//! expiry), with the gateway's database in SQLite and in PostgreSQL, where a second gateway
//! replica sees the approvals of the first.

use std::time::Duration;

use cms_cardcrypto::{KeyAlgorithm, Scheme, SecretKey};
use cms_kit::client::Channel;
use cms_kit::pki::LeafSpec;
use cms_kit::tls::TlsSettings;
use cms_proto::common::v1::{
    CardProfile, ErrorReason, Flow, KeyAlgorithm as Alg, PageRequest, TypedCode,
};
use cms_proto::custody::v1::AuditEvent;
use cms_proto::custody::v1::custody_service_client::CustodyServiceClient;
use cms_proto::directory::v1::directory_service_client::DirectoryServiceClient;
use cms_proto::directory::v1::{
    CreateOperatorRequest, CreateUserRequest, Credential, Operator, OperatorScope, OperatorStatus,
    RegisterCredentialRequest, UpdateOperatorRequest, User,
};
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::HelpdeskAction;
use cms_proto::gateway::v1::admin_service_client::AdminServiceClient;
use cms_proto::gateway::v1::approval_service_client::ApprovalServiceClient;
use cms_proto::gateway::v1::helpdesk_service_client::HelpdeskServiceClient;
use cms_tests::cluster::Cluster;
use cms_tests::custody::{hex, import};
use tonic::Code;

const VECTORS: &str = include_str!("agent_common/diversification.json");
const MASTER_KEY: &str = "mk-helpdesk";

/// The first shared vector (gp-emv): master key, card id, challenge and response with their
/// checksums.
struct Vector {
    master_key: Vec<u8>,
    card_id: Vec<u8>,
    challenge: String,
    challenge_checksum: String,
    response: String,
    response_checksum: String,
}

fn vector() -> Vector {
    let all: serde_json::Value = serde_json::from_str(VECTORS).expect("vectors");
    let v = all
        .as_array()
        .expect("array")
        .iter()
        .find(|v| v["scheme"] == "gp-emv")
        .expect("a gp-emv vector");
    let s = |k: &str| v[k].as_str().expect(k).to_owned();
    Vector {
        master_key: hex(&s("master_key")),
        card_id: hex(&s("card_id")),
        challenge: s("challenge"),
        challenge_checksum: s("challenge_checksum"),
        response: s("response"),
        response_checksum: s("response_checksum"),
    }
}

/// Upper-case hex in groups of 4, as people read codes.
fn groups(flat: &str) -> String {
    flat.as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The response a card with `card_id` expects for `challenge` (3DES gp-emv under the vector
/// master key), computed here independently of the servers.
fn expected_response(master: &[u8], card_id: &[u8], challenge: &[u8]) -> TypedCode {
    let master = SecretKey::new(KeyAlgorithm::Tdes2Key, master).expect("master key");
    let admin = cms_cardcrypto::diversify(Scheme::GpEmv, &master, card_id, 1, 16).expect("key");
    let response = cms_cardcrypto::response(&admin, challenge).expect("response");
    TypedCode {
        hex: cms_cardcrypto::format_groups(&response),
        checksum: cms_cardcrypto::checksum(&response),
    }
}

fn typed(hex_digits: &[u8]) -> TypedCode {
    TypedCode {
        hex: cms_cardcrypto::format_groups(hex_digits),
        checksum: cms_cardcrypto::checksum(hex_digits),
    }
}

/// The system, with the operators, users, cards and templates of the scenes below.
struct Desk {
    cluster: Cluster,
    directory: DirectoryServiceClient<Channel>,
    admin: AdminServiceClient<Channel>,
    vector: Vector,
    /// The user of the vector card, in Finance/Payroll.
    alice: User,
    alice_card: Credential,
    /// A user in Sales, outside the helpdesk operator's scope.
    bob: User,
    bob_card: Credential,
    /// A card whose template allows no offline unblock.
    online_only_card: Credential,
    /// A card whose template asks for a second operator's approval (approvals last 2 s).
    dual_card: Credential,
}

async fn start(gateway_extra: String) -> Desk {
    let cluster = Cluster::start(move |name| {
        if name == "gateway" {
            format!("[operators]\ncache_ttl_ms = 200\n{gateway_extra}")
        } else {
            String::new()
        }
    })
    .await;
    let directory =
        cms_launcher::bootstrap::directory_client(&cluster.layout, cluster.grpc("directory"))
            .expect("directory client");
    let admin = AdminServiceClient::new(channel(&cluster, cluster.pki.tls("operator/admin")));
    let vector = vector();

    let mut custody = CustodyServiceClient::new(cms_tests::inproc::channel(
        cluster.pki.tls("gateway"),
        cluster.grpc("custody"),
        cluster.pki.id("custody"),
    ));
    import(
        &mut custody,
        MASTER_KEY,
        KeyAlgorithm::Tdes2Key,
        &vector.master_key,
    )
    .await;

    let mut desk = Desk {
        cluster,
        directory,
        admin,
        vector,
        alice: User::default(),
        alice_card: Credential::default(),
        bob: User::default(),
        bob_card: Credential::default(),
        online_only_card: Credential::default(),
        dual_card: Credential::default(),
    };
    let offline = desk.template("Helpdesk offline", |_| {}).await;
    let online_only = desk
        .template("Online only", |p| {
            p.offline_challenge_response_allowed = false;
            p.offline_self_service_allowed = false;
            p.user_may_choose = false;
            p.online_unblock_allowed = true;
        })
        .await;
    let dual = desk
        .template("Dual control", |p| {
            let op = p.operator_policy.as_mut().expect("operator policy");
            op.dual_control = true;
            op.approval_ttl = Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            });
        })
        .await;
    desk.alice = desk.user("alice", "Alice Vector", "Finance/Payroll").await;
    desk.bob = desk.user("bob", "Bob Outside", "Sales").await;
    let (alice, bob) = (desk.alice.id.clone(), desk.bob.id.clone());
    let vector_card = desk.vector.card_id.clone();
    desk.alice_card = desk.card(&alice, vector_card, "SER-VECTOR", &offline).await;
    desk.bob_card = desk
        .card(&bob, b"bob-card-1".to_vec(), "SER-BOB", &offline)
        .await;
    desk.online_only_card = desk
        .card(&alice, b"alice-online".to_vec(), "SER-ONLINE", &online_only)
        .await;
    desk.dual_card = desk
        .card(&alice, b"alice-dual-1".to_vec(), "SER-DUAL", &dual)
        .await;

    desk.operator("helpdesk1", &["helpdesk"], &["Finance"])
        .await;
    desk.operator("approver1", &["approver"], &[]).await;
    desk.operator("auditor1", &["auditor"], &[]).await;
    // The gateway re-reads operator accounts after 200 ms here.
    tokio::time::sleep(Duration::from_millis(400)).await;
    desk
}

fn channel(cluster: &Cluster, tls: TlsSettings) -> Channel {
    cms_tests::inproc::channel(tls, cluster.grpc("gateway"), cluster.pki.id("gateway"))
}

/// A certificate for `spiffe://cms.test/cms/operator/<name>`.
fn operator_tls(cluster: &Cluster, name: &str) -> TlsSettings {
    let id = cluster.pki.id(&format!("operator/{name}"));
    cluster
        .pki
        .issue(&format!("operator-{name}"), &LeafSpec::new(id, 30))
}

impl Desk {
    async fn template(
        &mut self,
        name: &str,
        edit: impl FnOnce(&mut cms_proto::template::v1::UnblockPolicy),
    ) -> cms_proto::template::v1::Template {
        let mut spec = cms_template::sample::minidriver(name);
        let key = spec.admin_key.as_mut().expect("admin key");
        key.master_key_reference = MASTER_KEY.into();
        key.algorithm = Alg::Tdes2key as i32;
        let policy = spec.unblock_policy.as_mut().expect("unblock policy");
        policy.rate_limits.clear();
        edit(policy);
        self.create_template(spec).await
    }

    async fn create_template(
        &mut self,
        spec: cms_proto::template::v1::TemplateSpec,
    ) -> cms_proto::template::v1::Template {
        let name = spec.name.clone();
        self.admin
            .create_template(gw::CreateTemplateRequest {
                spec: Some(spec),
                change_comment: "helpdesk test".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("template {name}: {e:?}"))
            .into_inner()
            .template
            .expect("template")
    }

    async fn user(&mut self, username: &str, display: &str, org_unit: &str) -> User {
        self.directory
            .create_user(CreateUserRequest {
                user: Some(User {
                    username: username.into(),
                    display_name: display.into(),
                    email: format!("{username}@example.com"),
                    org_unit: org_unit.into(),
                    ..Default::default()
                }),
                auth: None,
            })
            .await
            .unwrap_or_else(|e| panic!("user {username}: {e:?}"))
            .into_inner()
            .user
            .expect("user")
    }

    async fn card(
        &mut self,
        user_id: &str,
        card_id: Vec<u8>,
        serial: &str,
        template: &cms_proto::template::v1::Template,
    ) -> Credential {
        self.card_of(user_id, card_id, serial, template, CardProfile::Minidriver)
            .await
    }

    async fn card_of(
        &mut self,
        user_id: &str,
        card_id: Vec<u8>,
        serial: &str,
        template: &cms_proto::template::v1::Template,
        profile: CardProfile,
    ) -> Credential {
        self.directory
            .register_credential(RegisterCredentialRequest {
                credential: Some(Credential {
                    user_id: user_id.into(),
                    card_id,
                    serial: serial.into(),
                    profile: profile as i32,
                    puk_version: 1,
                    template_id: template.id.clone(),
                    template_version: template.version,
                    master_key_version: 1,
                    ..Default::default()
                }),
                auth: None,
            })
            .await
            .unwrap_or_else(|e| panic!("card {serial}: {e:?}"))
            .into_inner()
            .credential
            .expect("credential")
    }

    async fn operator(&mut self, name: &str, roles: &[&str], org_units: &[&str]) -> Operator {
        self.directory
            .create_operator(CreateOperatorRequest {
                operator: Some(Operator {
                    username: name.into(),
                    display_name: format!("Operator {name}"),
                    roles: roles.iter().map(|r| (*r).to_owned()).collect(),
                    scope: Some(OperatorScope {
                        org_units: org_units.iter().map(|u| (*u).to_owned()).collect(),
                        template_ids: Vec::new(),
                    }),
                    ..Default::default()
                }),
                auth: None,
            })
            .await
            .unwrap_or_else(|e| panic!("operator {name}: {e:?}"))
            .into_inner()
            .operator
            .expect("operator")
    }

    fn helpdesk(&self, name: &str) -> HelpdeskServiceClient<Channel> {
        HelpdeskServiceClient::new(channel(&self.cluster, operator_tls(&self.cluster, name)))
    }

    fn approvals(&self, name: &str) -> ApprovalServiceClient<Channel> {
        ApprovalServiceClient::new(channel(&self.cluster, operator_tls(&self.cluster, name)))
    }

    /// How many cryptogram records custody's audit holds (refused ones included).
    async fn audit_head(&mut self) -> usize {
        self.admin
            .query_audit(gw::QueryAuditRequest {
                events: vec![AuditEvent::Cryptogram as i32],
                page: Some(PageRequest {
                    page_size: 1000,
                    page_token: String::new(),
                }),
                ..Default::default()
            })
            .await
            .expect("audit query")
            .into_inner()
            .records
            .len()
    }
}

/// Every row of the gateway's decision log: rpc, actor, result, rule, user, template, reason.
async fn decisions(desk: &Desk) -> Vec<[String; 7]> {
    use sea_orm::ConnectionTrait;
    let file = desk
        .cluster
        .layout
        .service_dir("gateway")
        .join("gateway.sqlite3");
    let db = sea_orm::Database::connect(format!("sqlite://{}?mode=ro", file.display()))
        .await
        .expect("gateway database");
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT rpc, actor, result, rule, user_id, template_id, reason FROM decisions ORDER BY id",
        ))
        .await
        .expect("decisions");
    rows.iter()
        .map(|row| {
            [
                "rpc",
                "actor",
                "result",
                "rule",
                "user_id",
                "template_id",
                "reason",
            ]
            .map(|c| row.try_get::<String>("", c).expect(c))
        })
        .collect()
}

fn offline_request(
    user: &User,
    card: &Credential,
    challenge: TypedCode,
    approval_id: &str,
) -> gw::ComputeOfflineResponseRequest {
    gw::ComputeOfflineResponseRequest {
        user_id: user.id.clone(),
        credential_id: card.id.clone(),
        challenge: Some(challenge),
        flow: Flow::OfflineHelpdesk as i32,
        approval_id: approval_id.into(),
        ticket_reference: "INC-1234".into(),
    }
}

fn reason(status: &tonic::Status) -> ErrorReason {
    let detail = cms_kit::error_details::detail(status).expect("an ErrorDetail");
    ErrorReason::try_from(detail.reason).expect("reason")
}

/// Expects a refusal with `code` whose message contains `text`.
fn refused<T: std::fmt::Debug>(
    outcome: Result<T, tonic::Status>,
    code: Code,
    text: &str,
) -> tonic::Status {
    let status = outcome.expect_err("a refusal");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(text),
        "expected {text:?} in {:?}",
        status.message()
    );
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_unblocks_offline_and_the_rules_hold() {
    let mut desk =
        start("[helpdesk]\nservice_callers = [\"spiffe://cms.test/cms/service/itsm\"]\n".into())
            .await;
    let mut helpdesk = desk.helpdesk("helpdesk1");

    // Who am I, then the search and the user's cards.
    let me = helpdesk
        .who_am_i(gw::WhoAmIRequest {})
        .await
        .expect("who am I")
        .into_inner();
    assert_eq!(me.operator.expect("operator").username, "helpdesk1");
    assert!(me.allowed_services.contains(&"HelpdeskService".to_owned()));
    let found = helpdesk
        .search_users(gw::SearchUsersRequest {
            query: "alice".into(),
            ..Default::default()
        })
        .await
        .expect("search")
        .into_inner()
        .results;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].user.as_ref().expect("user").id, desk.alice.id);
    // Bob (Sales) is outside the operator's org units: the search does not find him.
    let outside = helpdesk
        .search_users(gw::SearchUsersRequest {
            query: "bob".into(),
            ..Default::default()
        })
        .await
        .expect("search")
        .into_inner()
        .results;
    assert!(outside.is_empty(), "{outside:?}");
    let cards = helpdesk
        .get_user_cards(gw::GetUserCardsRequest {
            user_id: desk.alice.id.clone(),
            include_inactive: false,
        })
        .await
        .expect("cards")
        .into_inner()
        .cards;
    let view = |id: &str| {
        cards
            .iter()
            .find(|c| c.credential.as_ref().is_some_and(|c| c.id == id))
            .expect("card view")
            .clone()
    };
    let vector_view = view(&desk.alice_card.id);
    assert_eq!(vector_view.challenge_length, 8);
    assert!(
        vector_view
            .allowed_actions
            .contains(&(HelpdeskAction::OfflineResponse as i32))
    );
    let dual_view = view(&desk.dual_card.id);
    assert!(
        dual_view
            .approval_required_actions
            .contains(&(HelpdeskAction::OfflineResponse as i32))
    );
    let online_view = view(&desk.online_only_card.id);
    assert!(
        !online_view
            .allowed_actions
            .contains(&(HelpdeskAction::OfflineResponse as i32)),
        "{online_view:?}"
    );

    // A typo in the checksum is refused at the gateway: custody's audit gains no record.
    let head = desk.audit_head().await;
    let mut wrong = TypedCode {
        hex: groups(&desk.vector.challenge),
        checksum: desk.vector.challenge_checksum.clone(),
    };
    wrong.checksum.replace_range(
        3..4,
        if wrong.checksum.ends_with('0') {
            "1"
        } else {
            "0"
        },
    );
    let status = refused(
        helpdesk
            .compute_offline_response(offline_request(&desk.alice, &desk.alice_card, wrong, ""))
            .await,
        Code::InvalidArgument,
        "checksum does not match",
    );
    assert_eq!(reason(&status), ErrorReason::CodeChecksumMismatch);
    assert_eq!(desk.audit_head().await, head, "custody was called");

    // The vector's challenge, typed in lower case without spaces, gives the vector's response.
    let challenge = TypedCode {
        hex: desk.vector.challenge.to_lowercase(),
        checksum: desk.vector.challenge_checksum.clone(),
    };
    let answer = helpdesk
        .compute_offline_response(offline_request(
            &desk.alice,
            &desk.alice_card,
            challenge,
            "",
        ))
        .await
        .expect("offline response")
        .into_inner();
    let response = answer.response.expect("response");
    assert_eq!(response.hex, groups(&desk.vector.response));
    assert_eq!(response.checksum, desk.vector.response_checksum);
    assert_eq!(desk.audit_head().await, head + 1, "one audit record");

    // No helpdesk role: refused with the reason.
    let mut auditor = desk.helpdesk("auditor1");
    refused(
        auditor
            .compute_offline_response(offline_request(
                &desk.alice,
                &desk.alice_card,
                typed(&[1, 2, 3, 4, 5, 6, 7, 8]),
                "",
            ))
            .await,
        Code::PermissionDenied,
        "needs the helpdesk role (it has: auditor)",
    );
    // A user outside the operator's scope.
    refused(
        helpdesk
            .compute_offline_response(offline_request(
                &desk.bob,
                &desk.bob_card,
                typed(&[1, 2, 3, 4, 5, 6, 7, 8]),
                "",
            ))
            .await,
        Code::PermissionDenied,
        "outside the scope",
    );
    // A template that forbids offline unblock.
    let status = refused(
        helpdesk
            .compute_offline_response(offline_request(
                &desk.alice,
                &desk.online_only_card,
                typed(&[1, 2, 3, 4, 5, 6, 7, 8]),
                "",
            ))
            .await,
        Code::FailedPrecondition,
        "does not allow offline unblock",
    );
    assert_eq!(reason(&status), ErrorReason::FlowNotAllowed);
    // None of these reached custody.
    assert_eq!(desk.audit_head().await, head + 1);

    // Dual control on one gateway.
    dual_control(
        &desk,
        &mut helpdesk,
        &mut desk.approvals("helpdesk1"),
        &mut desk.approvals("approver1"),
    )
    .await;

    // A disabled operator is refused once the gateway re-reads the accounts.
    let disabled = desk.operator("leaver", &["helpdesk"], &[]).await;
    let mut leaver = desk.helpdesk("leaver");
    // The gateway re-reads operator accounts after 200 ms here.
    tokio::time::sleep(Duration::from_millis(400)).await;
    leaver
        .who_am_i(gw::WhoAmIRequest {})
        .await
        .expect("active first");
    desk.directory
        .update_operator(UpdateOperatorRequest {
            operator: Some(Operator {
                id: disabled.id.clone(),
                status: OperatorStatus::Disabled as i32,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["status".into()],
            }),
            auth: None,
        })
        .await
        .expect("disable");
    tokio::time::sleep(Duration::from_millis(400)).await;
    refused(
        leaver
            .compute_offline_response(offline_request(
                &desk.alice,
                &desk.alice_card,
                typed(&[1, 2, 3, 4, 5, 6, 7, 8]),
                "",
            ))
            .await,
        Code::PermissionDenied,
        "is disabled",
    );

    // A granted service acts for the operator it names; the same rules apply.
    let service = |name: &str| {
        let id = desk.cluster.pki.id(&format!("service/{name}"));
        let tls = desk
            .cluster
            .pki
            .issue(&format!("service-{name}"), &LeafSpec::new(id, 30));
        HelpdeskServiceClient::new(channel(&desk.cluster, tls))
    };
    let on_behalf = |operator: Option<&str>, challenge: &[u8]| {
        let mut request = tonic::Request::new(offline_request(
            &desk.alice,
            &desk.alice_card,
            typed(challenge),
            "",
        ));
        if let Some(operator) = operator {
            request
                .metadata_mut()
                .insert("x-cms-operator", operator.parse().expect("header"));
        }
        request
    };
    let challenge = [0xA1, 0xB2, 0xC3, 0xD4, 0xE5, 0xF6, 0x07, 0x18];
    let mut itsm = service("itsm");
    refused(
        itsm.compute_offline_response(on_behalf(None, &challenge))
            .await,
        Code::PermissionDenied,
        "x-cms-operator",
    );
    refused(
        itsm.compute_offline_response(on_behalf(Some("auditor1"), &challenge))
            .await,
        Code::PermissionDenied,
        "needs the helpdesk role",
    );
    refused(
        service("billing")
            .compute_offline_response(on_behalf(Some("helpdesk1"), &challenge))
            .await,
        Code::PermissionDenied,
        "not granted the helpdesk workflow",
    );
    let answer = itsm
        .compute_offline_response(on_behalf(Some("helpdesk1"), &challenge))
        .await
        .expect("service on behalf of helpdesk1")
        .into_inner()
        .response
        .expect("response");
    assert_eq!(
        answer,
        expected_response(
            &desk.vector.master_key,
            &desk.alice_card.card_id,
            &challenge
        )
    );

    // The decision log in the gateway's database: who, what, for whom, which rule, result;
    // AdminService calls too; never a challenge or a response.
    let decisions = decisions(&desk).await;
    let has = |rpc: &str, actor: &str, result: &str, rule: &str| {
        decisions
            .iter()
            .any(|d| d[0] == rpc && d[1] == actor && d[2] == result && d[3] == rule)
    };
    assert!(
        has("ComputeOfflineResponse", "helpdesk1", "ok", "custody"),
        "{decisions:#?}"
    );
    assert!(
        decisions.iter().any(|d| d[0] == "ComputeOfflineResponse"
            && d[2] == "ok"
            && d[4] == desk.alice.id
            && d[5] == desk.alice_card.template_id),
        "{decisions:#?}"
    );
    assert!(
        has(
            "ComputeOfflineResponse",
            "helpdesk1",
            "InvalidArgument",
            "challenge"
        ),
        "{decisions:#?}"
    );
    assert!(
        has(
            "ComputeOfflineResponse",
            "helpdesk1",
            "FailedPrecondition",
            "unblock_policy.offline_challenge_response_allowed"
        ),
        "{decisions:#?}"
    );
    assert!(
        has("create_template", "admin", "ok", "roles"),
        "{decisions:#?}"
    );
    let everything = format!("{decisions:?}");
    for secret in [&desk.vector.challenge, &desk.vector.response] {
        for shown in [secret.clone(), groups(secret), secret.to_lowercase()] {
            assert!(!everything.contains(&shown), "a code in the decision log");
        }
    }

    // A backend down is a plain message, not a transport error.
    desk.cluster
        .service("custody")
        .stop(Duration::from_secs(15))
        .await;
    refused(
        helpdesk
            .compute_offline_response(offline_request(
                &desk.alice,
                &desk.alice_card,
                typed(&[3, 1, 4, 1, 5, 9, 2, 6]),
                "",
            ))
            .await,
        Code::Unavailable,
        "the custody service is unavailable",
    );
}

/// No cryptogram before approval; the requester cannot approve; a pending, used or expired
/// approval is refused; a valid one gives the response once. `requester` and `approver` may
/// talk to different gateways.
async fn dual_control(
    desk: &Desk,
    helpdesk: &mut HelpdeskServiceClient<Channel>,
    requester: &mut ApprovalServiceClient<Channel>,
    approver: &mut ApprovalServiceClient<Channel>,
) {
    let (user, card) = (&desk.alice, &desk.dual_card);
    let challenge = [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88];
    let status = refused(
        helpdesk
            .compute_offline_response(offline_request(user, card, typed(&challenge), ""))
            .await,
        Code::FailedPrecondition,
        "requires a second operator's approval",
    );
    assert_eq!(reason(&status), ErrorReason::ApprovalRequired);

    let ask = |reason: &str| gw::RequestApprovalRequest {
        action: HelpdeskAction::OfflineResponse as i32,
        user_id: user.id.clone(),
        credential_id: card.id.clone(),
        reason: reason.into(),
        ticket_reference: "INC-42".into(),
    };
    let pending = requester
        .request_approval(ask("user on the phone, verified by call-back"))
        .await
        .expect("request approval")
        .into_inner()
        .approval
        .expect("approval");
    assert_eq!(pending.state, gw::ApprovalState::Pending as i32);
    refused(
        requester
            .approve(gw::ApproveRequest {
                id: pending.id.clone(),
                comment: String::new(),
            })
            .await,
        Code::PermissionDenied,
        "may not decide it",
    );
    refused(
        helpdesk
            .compute_offline_response(offline_request(user, card, typed(&challenge), &pending.id))
            .await,
        Code::FailedPrecondition,
        "still waiting for a decision",
    );
    let listed = approver
        .list_pending_approvals(gw::ListPendingApprovalsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .approvals;
    assert!(listed.iter().any(|a| a.id == pending.id), "{listed:?}");
    // The requester sees its own request only when it asks for it.
    let own = |include_own| gw::ListPendingApprovalsRequest {
        page: None,
        include_own,
    };
    let mine = requester
        .list_pending_approvals(own(false))
        .await
        .expect("list")
        .into_inner()
        .approvals;
    assert!(mine.iter().all(|a| a.id != pending.id), "{mine:?}");
    let mine = requester
        .list_pending_approvals(own(true))
        .await
        .expect("list")
        .into_inner()
        .approvals;
    assert!(mine.iter().any(|a| a.id == pending.id), "{mine:?}");
    let approved = approver
        .approve(gw::ApproveRequest {
            id: pending.id.clone(),
            comment: "ok".into(),
        })
        .await
        .expect("approve")
        .into_inner()
        .approval
        .expect("approval");
    assert_eq!(approved.state, gw::ApprovalState::Approved as i32);
    assert_eq!(approved.decided_by, "approver1");

    let answer = helpdesk
        .compute_offline_response(offline_request(user, card, typed(&challenge), &pending.id))
        .await
        .expect("approved response")
        .into_inner()
        .response
        .expect("response");
    assert_eq!(
        answer,
        expected_response(&desk.vector.master_key, &card.card_id, &challenge)
    );
    refused(
        helpdesk
            .compute_offline_response(offline_request(
                user,
                card,
                typed(&[9, 9, 9, 9, 9, 9, 9, 9]),
                &pending.id,
            ))
            .await,
        Code::FailedPrecondition,
        "already used",
    );

    // An approval expires (the template grants 2 s).
    let second = requester
        .request_approval(ask("second call"))
        .await
        .expect("request approval")
        .into_inner()
        .approval
        .expect("approval");
    approver
        .approve(gw::ApproveRequest {
            id: second.id.clone(),
            comment: String::new(),
        })
        .await
        .expect("approve");
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    refused(
        helpdesk
            .compute_offline_response(offline_request(
                user,
                card,
                typed(&[7, 7, 7, 7, 7, 7, 7, 7]),
                &second.id,
            ))
            .await,
        Code::FailedPrecondition,
        "has expired",
    );

    // A rejected approval authorises nothing; only the requester may cancel, and a cancelled
    // request cannot be approved.
    let third = requester
        .request_approval(ask("third call"))
        .await
        .expect("request approval")
        .into_inner()
        .approval
        .expect("approval");
    let rejected = approver
        .reject(gw::RejectRequest {
            id: third.id.clone(),
            reason: "caller could not be verified".into(),
        })
        .await
        .expect("reject")
        .into_inner()
        .approval
        .expect("approval");
    assert_eq!(rejected.state, gw::ApprovalState::Rejected as i32);
    refused(
        helpdesk
            .compute_offline_response(offline_request(
                user,
                card,
                typed(&[6, 6, 6, 6, 6, 6, 6, 6]),
                &third.id,
            ))
            .await,
        Code::FailedPrecondition,
        "was rejected",
    );
    let fourth = requester
        .request_approval(ask("fourth call"))
        .await
        .expect("request approval")
        .into_inner()
        .approval
        .expect("approval");
    refused(
        approver
            .cancel_approval(gw::CancelApprovalRequest {
                id: fourth.id.clone(),
            })
            .await,
        Code::PermissionDenied,
        "only the requester may cancel",
    );
    let cancelled = requester
        .cancel_approval(gw::CancelApprovalRequest {
            id: fourth.id.clone(),
        })
        .await
        .expect("cancel")
        .into_inner()
        .approval
        .expect("approval");
    assert_eq!(cancelled.state, gw::ApprovalState::Cancelled as i32);
    refused(
        approver
            .approve(gw::ApproveRequest {
                id: fourth.id.clone(),
                comment: String::new(),
            })
            .await,
        Code::FailedPrecondition,
        "is cancelled, not pending",
    );
}

/// The gateway's database in PostgreSQL, shared by a second gateway replica (in this process,
/// on the same config): an approval requested at one is listed and approved at the other, and
/// used at the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_the_same_postgresql_sees_the_approvals() {
    const LIMIT: u32 = 40;
    let pg = cms_tests::postgres::Postgres::shared();
    let url = pg.create_database();
    let desk = start(format!(
        "[helpdesk]\noperator_requests_per_window = {LIMIT}\noperator_window_ms = 3600000\n\n[database]\nurl = \"{url}\"\n"
    ))
    .await;

    let text = std::fs::read_to_string(desk.cluster.layout.config_path("gateway")).expect("config");
    let config: cms_gateway::Config = cms_kit::config::from_toml(&text).expect("gateway config");
    let second = cms_tests::inproc::Running::start(config, cms_gateway::run).await;
    let at_second = |name: &str| {
        ApprovalServiceClient::new(cms_tests::inproc::channel(
            operator_tls(&desk.cluster, name),
            second.grpc,
            desk.cluster.pki.id("gateway"),
        ))
    };

    let mut helpdesk = desk.helpdesk("helpdesk1");
    let mut requester = desk.approvals("helpdesk1");
    let mut approver = at_second("approver1");
    dual_control(&desk, &mut helpdesk, &mut requester, &mut approver).await;

    // The per-operator limit is counted in the shared database: calls alternating between the
    // replicas are refused once their sum reaches it.
    let mut at_first = desk.helpdesk("auditor1");
    let mut at_second_desk = HelpdeskServiceClient::new(cms_tests::inproc::channel(
        operator_tls(&desk.cluster, "auditor1"),
        second.grpc,
        desk.cluster.pki.id("gateway"),
    ));
    for n in 0..LIMIT {
        let client = if n % 2 == 0 {
            &mut at_first
        } else {
            &mut at_second_desk
        };
        client
            .who_am_i(gw::WhoAmIRequest {})
            .await
            .unwrap_or_else(|e| panic!("call {n}: {e:?}"));
    }
    let status = refused(
        at_second_desk.who_am_i(gw::WhoAmIRequest {}).await,
        Code::ResourceExhausted,
        "operator request limit",
    );
    assert_eq!(reason(&status), ErrorReason::RateLimited);
    second.stop().await.expect("second gateway stops cleanly");
}

/// The other offline actions: a one-time code (shown once, stored only hashed), a PIV card's
/// PUK read out (custody derives it; the gateway passes it with its checksum), and a card
/// reported lost, after which it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_time_codes_piv_puks_and_card_status() {
    let mut desk = start(String::new()).await;
    let mut helpdesk = desk.helpdesk("helpdesk1");

    // One-time code: the template's length (8), its validity (900 s), never stored in clear.
    let issued = helpdesk
        .issue_one_time_code(gw::IssueOneTimeCodeRequest {
            user_id: desk.alice.id.clone(),
            credential_id: desk.alice_card.id.clone(),
            ticket_reference: "INC-7".into(),
            approval_id: String::new(),
        })
        .await
        .expect("one-time code")
        .into_inner();
    assert_eq!(issued.code.len(), 8, "{}", issued.code.len());
    let expires = issued.expires_at.expect("expiry").seconds;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!(
        (now + 890..=now + 910).contains(&expires),
        "{expires} vs {now}"
    );
    let gateway_dir = desk.cluster.layout.service_dir("gateway");
    for entry in std::fs::read_dir(&gateway_dir).expect("gateway data dir") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("read");
        assert!(
            !bytes
                .windows(issued.code.len())
                .any(|w| w == issued.code.as_bytes()),
            "the code is stored in clear"
        );
    }
    // The auditor may look but not issue.
    refused(
        desk.helpdesk("auditor1")
            .issue_one_time_code(gw::IssueOneTimeCodeRequest {
                user_id: desk.alice.id.clone(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "needs the helpdesk role",
    );

    // PIV: the current PUK with its checksum, from custody's derivation.
    let puk_master = hex("404142434445464748494A4B4C4D4E4F");
    let mut custody = CustodyServiceClient::new(cms_tests::inproc::channel(
        desk.cluster.pki.tls("gateway"),
        desk.cluster.grpc("custody"),
        desk.cluster.pki.id("custody"),
    ));
    import(
        &mut custody,
        "mk-piv-admin",
        KeyAlgorithm::Aes128,
        &puk_master,
    )
    .await;
    import(
        &mut custody,
        "mk-piv-puk",
        KeyAlgorithm::Aes128,
        &puk_master,
    )
    .await;
    let mut spec = cms_template::sample::piv("PIV desk");
    spec.admin_key
        .as_mut()
        .expect("admin key")
        .master_key_reference = "mk-piv-admin".into();
    spec.puk.as_mut().expect("puk").master_key_reference = "mk-piv-puk".into();
    let policy = spec.unblock_policy.as_mut().expect("policy");
    policy
        .operator_policy
        .as_mut()
        .expect("operator policy")
        .dual_control = false;
    let piv = desk.create_template(spec).await;
    let alice = desk.alice.id.clone();
    let card_id = hex("6F1D2B3C4D5E6F708192A3B4C5D6E7F8");
    let piv_card = desk
        .card_of(&alice, card_id.clone(), "SER-PIV", &piv, CardProfile::Piv)
        .await;
    let read = helpdesk
        .read_piv_puk(gw::ReadPivPukRequest {
            user_id: alice.clone(),
            credential_id: piv_card.id.clone(),
            approval_id: String::new(),
            ticket_reference: "INC-8".into(),
        })
        .await
        .expect("PUK")
        .into_inner();
    let master = SecretKey::new(KeyAlgorithm::Aes128, &puk_master).expect("key");
    let expected = cms_cardcrypto::derive_puk(
        &master,
        &cms_cardcrypto::PukInput {
            card_id: &card_id,
            master_key_version: 1,
            puk_version: piv_card.puk_version,
            digits: 8,
        },
    )
    .expect("derive");
    let expected = std::str::from_utf8(expected.expose_digits())
        .expect("digits")
        .to_owned();
    assert_eq!(read.puk, expected);
    assert_eq!(read.puk_code.expect("code"), typed(read.puk.as_bytes()));
    assert!(read.exposed);
    // A minidriver card has no PUK.
    refused(
        helpdesk
            .read_piv_puk(gw::ReadPivPukRequest {
                user_id: alice.clone(),
                credential_id: desk.alice_card.id.clone(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "not a PIV card",
    );

    // A card reported lost is refused from then on; reinstating it is for admins.
    let lost = helpdesk
        .update_card_status(gw::UpdateCardStatusRequest {
            credential_id: desk.alice_card.id.clone(),
            status: cms_proto::directory::v1::CredentialStatus::Lost as i32,
            reason: "left on the train".into(),
            ticket_reference: "INC-9".into(),
        })
        .await
        .expect("report lost")
        .into_inner()
        .credential
        .expect("credential");
    assert_eq!(
        lost.status,
        cms_proto::directory::v1::CredentialStatus::Lost as i32
    );
    let status = refused(
        helpdesk
            .compute_offline_response(offline_request(
                &desk.alice,
                &desk.alice_card,
                typed(&[1, 2, 3, 4, 5, 6, 7, 8]),
                "",
            ))
            .await,
        Code::FailedPrecondition,
        "is lost",
    );
    assert_eq!(reason(&status), ErrorReason::CardNotActive);
    refused(
        helpdesk
            .update_card_status(gw::UpdateCardStatusRequest {
                credential_id: desk.alice_card.id.clone(),
                status: cms_proto::directory::v1::CredentialStatus::Active as i32,
                reason: "found".into(),
                ticket_reference: String::new(),
            })
            .await,
        Code::PermissionDenied,
        "needs the admin role",
    );
    // Bob's card is outside the operator's scope.
    refused(
        helpdesk
            .update_card_status(gw::UpdateCardStatusRequest {
                credential_id: desk.bob_card.id.clone(),
                status: cms_proto::directory::v1::CredentialStatus::Lost as i32,
                reason: "reported".into(),
                ticket_reference: String::new(),
            })
            .await,
        Code::PermissionDenied,
        "outside the scope",
    );

    // AdminService keeps to the scope too: a directory admin for Finance changes Finance only.
    desk.operator("finance-admin", &["directory-admin"], &["Finance"])
        .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut scoped = AdminServiceClient::new(channel(
        &desk.cluster,
        operator_tls(&desk.cluster, "finance-admin"),
    ));
    let new_user = |unit: &str| gw::CreateUserRequest {
        user: Some(User {
            username: format!("new-{}", unit.replace('/', "-").to_lowercase()),
            display_name: "New Hire".into(),
            org_unit: unit.into(),
            ..Default::default()
        }),
    };
    scoped
        .create_user(new_user("Finance/Treasury"))
        .await
        .expect("a user in scope");
    refused(
        scoped.create_user(new_user("Sales")).await,
        Code::PermissionDenied,
        "org unit \"Sales\" is outside the scope of operator \"finance-admin\"",
    );
    refused(
        scoped
            .update_credential_status(gw::UpdateCredentialStatusRequest {
                id: desk.bob_card.id.clone(),
                status: cms_proto::directory::v1::CredentialStatus::Revoked as i32,
                reason: "no".into(),
            })
            .await,
        Code::PermissionDenied,
        "outside the scope",
    );
    refused(
        scoped
            .import_users(futures_util::stream::iter(
                Vec::<gw::ImportUsersRequest>::new(),
            ))
            .await,
        Code::PermissionDenied,
        "may touch any user",
    );
}
