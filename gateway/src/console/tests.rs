//! The console's HTTP contract against small in-test workflow implementations: that it passes
//! the peer identity and the request on unchanged, maps refusals, and keeps its headers.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use cms_kit::PeerIdentity;
use cms_kit::error_details::Refusal;
use cms_proto::common::v1::{ErrorReason, Flow, TypedCode};
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::approval_service_server::ApprovalService;
use cms_proto::gateway::v1::helpdesk_service_server::HelpdeskService;
use serde_json::Value;
use tonic::{Code, Response, Status};
use tower::ServiceExt;

use super::{AuditQuery, Services, mount};

/// What the fake workflow saw: the method, the caller, and the request as Debug (redacted
/// where the proto says so).
#[derive(Default)]
struct Seen(Mutex<Vec<(String, String, String)>>);

impl Seen {
    fn record<T: std::fmt::Debug>(&self, method: &str, r: &tonic::Request<T>) {
        let caller = PeerIdentity::of(r)
            .map(|p| p.spiffe_id.to_string())
            .unwrap_or_default();
        self.0
            .lock()
            .unwrap()
            .push((method.into(), caller, format!("{:?}", r.get_ref())));
    }

    fn methods(&self) -> Vec<String> {
        self.0.lock().unwrap().iter().map(|c| c.0.clone()).collect()
    }
}

struct FakeHelpdesk {
    seen: Arc<Seen>,
}

fn refused(code: Code, reason: ErrorReason, message: &str) -> Status {
    Refusal::new(code, reason, message).into_status("cms.gateway")
}

#[tonic::async_trait]
impl HelpdeskService for FakeHelpdesk {
    async fn who_am_i(
        &self,
        r: tonic::Request<gw::WhoAmIRequest>,
    ) -> Result<Response<gw::WhoAmIResponse>, Status> {
        self.seen.record("WhoAmI", &r);
        let peer = PeerIdentity::of(&r).ok_or_else(|| Status::unauthenticated("no peer"))?;
        Ok(Response::new(gw::WhoAmIResponse {
            operator: Some(cms_proto::directory::v1::Operator {
                username: "alice".into(),
                display_name: "Alice Helpdesk".into(),
                roles: vec!["helpdesk".into()],
                ..Default::default()
            }),
            peer_identity: peer.spiffe_id.to_string(),
            allowed_services: vec!["HelpdeskService".into()],
        }))
    }

    async fn search_users(
        &self,
        r: tonic::Request<gw::SearchUsersRequest>,
    ) -> Result<Response<gw::SearchUsersResponse>, Status> {
        self.seen.record("SearchUsers", &r);
        Ok(Response::new(gw::SearchUsersResponse::default()))
    }

    async fn get_user_cards(
        &self,
        r: tonic::Request<gw::GetUserCardsRequest>,
    ) -> Result<Response<gw::GetUserCardsResponse>, Status> {
        self.seen.record("GetUserCards", &r);
        Ok(Response::new(gw::GetUserCardsResponse {
            user: Some(cms_proto::directory::v1::User {
                id: r.get_ref().user_id.clone(),
                display_name: "Jane Doe".into(),
                status: cms_proto::directory::v1::UserStatus::Active as i32,
                ..Default::default()
            }),
            cards: vec![gw::CardView {
                challenge_length: 8,
                allowed_actions: vec![gw::HelpdeskAction::OfflineResponse as i32],
                ..Default::default()
            }],
        }))
    }

    async fn compute_offline_response(
        &self,
        r: tonic::Request<gw::ComputeOfflineResponseRequest>,
    ) -> Result<Response<gw::ComputeOfflineResponseResponse>, Status> {
        self.seen.record("ComputeOfflineResponse", &r);
        let req = r.get_ref();
        match req.user_id.as_str() {
            "outside-scope" => Err(refused(
                Code::PermissionDenied,
                ErrorReason::PermissionDenied,
                "user u-9 is outside your scope (org units: sales)",
            )),
            "custody-down" => Err(Status::unavailable(
                "tcp connect error: Connection refused (os error 111)",
            )),
            _ if req.flow != Flow::OfflineHelpdesk as i32 => {
                Err(Status::invalid_argument("unexpected flow"))
            }
            _ => Ok(Response::new(gw::ComputeOfflineResponseResponse {
                response: Some(TypedCode {
                    hex: "9CB2DC8314AFA496".into(),
                    checksum: "6340".into(),
                }),
                request_id: "req-1".into(),
                master_key_version: 1,
            })),
        }
    }

    async fn issue_one_time_code(
        &self,
        r: tonic::Request<gw::IssueOneTimeCodeRequest>,
    ) -> Result<Response<gw::IssueOneTimeCodeResponse>, Status> {
        self.seen.record("IssueOneTimeCode", &r);
        Err(Status::unimplemented("fake"))
    }

    async fn list_agents(
        &self,
        r: tonic::Request<gw::ListAgentsRequest>,
    ) -> Result<Response<gw::ListAgentsResponse>, Status> {
        self.seen.record("ListAgents", &r);
        Err(Status::unimplemented("fake"))
    }

    async fn get_agent_card(
        &self,
        r: tonic::Request<gw::GetAgentCardRequest>,
    ) -> Result<Response<gw::GetAgentCardResponse>, Status> {
        self.seen.record("GetAgentCard", &r);
        Err(Status::unimplemented("fake"))
    }

    async fn start_online_unblock(
        &self,
        r: tonic::Request<gw::StartOnlineUnblockRequest>,
    ) -> Result<Response<gw::StartOnlineUnblockResponse>, Status> {
        self.seen.record("StartOnlineUnblock", &r);
        Err(Status::unimplemented("fake"))
    }

    async fn read_piv_puk(
        &self,
        r: tonic::Request<gw::ReadPivPukRequest>,
    ) -> Result<Response<gw::ReadPivPukResponse>, Status> {
        self.seen.record("ReadPivPuk", &r);
        Ok(Response::new(gw::ReadPivPukResponse {
            puk: "12345678".into(),
            puk_code: Some(TypedCode {
                hex: "3132333435363738".into(),
                checksum: "ABCD".into(),
            }),
            puk_version: 2,
            exposed: true,
            request_id: "req-puk".into(),
        }))
    }

    async fn update_card_status(
        &self,
        r: tonic::Request<gw::UpdateCardStatusRequest>,
    ) -> Result<Response<gw::UpdateCardStatusResponse>, Status> {
        self.seen.record("UpdateCardStatus", &r);
        Ok(Response::new(gw::UpdateCardStatusResponse::default()))
    }
}

struct FakeApprovals {
    seen: Arc<Seen>,
}

fn approval(id: &str, state: gw::ApprovalState) -> gw::Approval {
    gw::Approval {
        id: id.into(),
        action: gw::HelpdeskAction::OfflineResponse as i32,
        state: state as i32,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl ApprovalService for FakeApprovals {
    async fn request_approval(
        &self,
        r: tonic::Request<gw::RequestApprovalRequest>,
    ) -> Result<Response<gw::RequestApprovalResponse>, Status> {
        self.seen.record("RequestApproval", &r);
        Ok(Response::new(gw::RequestApprovalResponse {
            approval: Some(approval("ap-1", gw::ApprovalState::Pending)),
        }))
    }

    async fn get_approval(
        &self,
        r: tonic::Request<gw::GetApprovalRequest>,
    ) -> Result<Response<gw::GetApprovalResponse>, Status> {
        self.seen.record("GetApproval", &r);
        Ok(Response::new(gw::GetApprovalResponse {
            approval: Some(approval(&r.get_ref().id, gw::ApprovalState::Pending)),
        }))
    }

    async fn list_pending_approvals(
        &self,
        r: tonic::Request<gw::ListPendingApprovalsRequest>,
    ) -> Result<Response<gw::ListPendingApprovalsResponse>, Status> {
        self.seen.record("ListPendingApprovals", &r);
        Ok(Response::new(gw::ListPendingApprovalsResponse {
            approvals: vec![approval("ap-1", gw::ApprovalState::Pending)],
            page: None,
        }))
    }

    async fn approve(
        &self,
        r: tonic::Request<gw::ApproveRequest>,
    ) -> Result<Response<gw::ApproveResponse>, Status> {
        self.seen.record("Approve", &r);
        Err(refused(
            Code::PermissionDenied,
            ErrorReason::PermissionDenied,
            "you requested this approval; another approver must decide it",
        ))
    }

    async fn reject(
        &self,
        r: tonic::Request<gw::RejectRequest>,
    ) -> Result<Response<gw::RejectResponse>, Status> {
        self.seen.record("Reject", &r);
        Ok(Response::new(gw::RejectResponse {
            approval: Some(approval(&r.get_ref().id, gw::ApprovalState::Rejected)),
        }))
    }

    async fn cancel_approval(
        &self,
        r: tonic::Request<gw::CancelApprovalRequest>,
    ) -> Result<Response<gw::CancelApprovalResponse>, Status> {
        self.seen.record("CancelApproval", &r);
        Ok(Response::new(gw::CancelApprovalResponse {
            approval: Some(approval(&r.get_ref().id, gw::ApprovalState::Cancelled)),
        }))
    }
}

fn console() -> (Router, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let audit_seen = seen.clone();
    let audit: AuditQuery = Arc::new(move |r| {
        audit_seen.record("QueryAudit", &r);
        Box::pin(async {
            Err(refused(
                Code::PermissionDenied,
                ErrorReason::PermissionDenied,
                "operator alice lacks a role to read the custody audit",
            ))
        })
    });
    let services = Services {
        helpdesk: Arc::new(FakeHelpdesk { seen: seen.clone() }),
        approvals: Arc::new(FakeApprovals { seen: seen.clone() }),
        audit,
    };
    (mount(Router::new(), services), seen)
}

const ALICE: &str = "spiffe://cms.test/cms/operator/alice";

fn request(method: Method, uri: &str, body: Option<Value>) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    if body.is_some() {
        builder = builder.header(header::CONTENT_TYPE, "application/json");
    }
    let mut request = builder
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    request.extensions_mut().insert(PeerIdentity {
        spiffe_id: ALICE.parse().unwrap(),
        remote_addr: None,
    });
    request
}

async fn call(router: &Router, request: Request<Body>) -> (StatusCode, header::HeaderMap, Value) {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, json)
}

#[tokio::test]
async fn the_workflow_sees_the_connections_peer_identity() {
    let (router, seen) = console();
    let (status, headers, json) = call(&router, request(Method::GET, "/api/v1/whoami", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["peer_identity"], ALICE);
    assert_eq!(json["operator"]["username"], "alice");
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert!(
        headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    let calls = seen.0.lock().unwrap().clone();
    assert_eq!(calls[0].0, "WhoAmI");
    assert_eq!(calls[0].1, ALICE);
}

#[tokio::test]
async fn offline_response_passes_the_challenge_and_returns_groups_of_four() {
    let (router, seen) = console();
    let (status, headers, json) = call(
        &router,
        request(
            Method::POST,
            "/api/v1/users/u-1/cards/c-1/offline-response",
            Some(serde_json::json!({
                "challenge": "1603 EBDF 1C8A 2E72",
                "checksum": "9D70",
                "ticket_reference": "INC-42",
            })),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["response"]["groups"], "9CB2 DC83 14AF A496");
    assert_eq!(json["response"]["checksum"], "6340");
    assert_eq!(json["request_id"], "req-1");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    let calls = seen.0.lock().unwrap().clone();
    let (method, caller, debug) = &calls[0];
    assert_eq!(method, "ComputeOfflineResponse");
    assert_eq!(caller, ALICE);
    assert!(debug.contains("u-1") && debug.contains("c-1") && debug.contains("INC-42"));
    // The proto's redacted Debug: the challenge never shows, even to a test.
    assert!(!debug.contains("EBDF"), "{debug}");
}

#[tokio::test]
async fn refusals_keep_their_reason_and_trouble_behind_becomes_plain() {
    let (router, _) = console();
    let uri = |user: &str| format!("/api/v1/users/{user}/cards/c-1/offline-response");
    let body = || Some(serde_json::json!({ "challenge": "1603EBDF1C8A2E72", "checksum": "9D70" }));

    let (status, _, json) = call(
        &router,
        request(Method::POST, &uri("outside-scope"), body()),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(json["error"]["code"], "PERMISSION_DENIED");
    assert_eq!(json["error"]["reason"], "PERMISSION_DENIED");
    assert_eq!(
        json["error"]["message"],
        "user u-9 is outside your scope (org units: sales)"
    );

    let (status, _, json) =
        call(&router, request(Method::POST, &uri("custody-down"), body())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let message = json["error"]["message"].as_str().unwrap();
    assert!(message.contains("not available right now"), "{message}");
    assert!(!message.contains("os error"), "{message}");

    let (status, _, json) = call(&router, request(Method::GET, "/api/v1/audit", None)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("custody audit")
    );

    let (status, _, json) = call(
        &router,
        request(
            Method::POST,
            "/api/v1/approvals/ap-1/approve",
            Some(serde_json::json!({})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("another approver")
    );
}

#[tokio::test]
async fn bad_input_is_refused_before_the_workflow_runs() {
    let (router, seen) = console();
    let uri = "/api/v1/users/u-1/cards/c-1/offline-response";
    // Not JSON (what a cross-site form could send).
    let mut form = request(Method::POST, uri, None);
    *form.body_mut() = Body::from("challenge=1603EBDF1C8A2E72");
    form.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/x-www-form-urlencoded".parse().unwrap(),
    );
    let (status, _, json) = call(&router, form).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(json["error"]["message"].as_str().unwrap().contains("JSON"));
    // A field that does not exist, or a secret where a number belongs: a generic message that
    // quotes nothing.
    let (status, _, json) = call(
        &router,
        request(
            Method::POST,
            uri,
            Some(serde_json::json!({ "challenge": "1603EBDF1C8A2E72", "pin": "123456" })),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(!json.to_string().contains("123456"), "{json}");
    // An unknown flow, an unknown action name.
    let (status, _, json) = call(
        &router,
        request(
            Method::POST,
            uri,
            Some(serde_json::json!({ "challenge": "1603EBDF1C8A2E72", "flow": "so-token" })),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["error"]["field"], "flow");
    let (status, _, _) = call(
        &router,
        request(
            Method::POST,
            "/api/v1/approvals",
            Some(serde_json::json!({ "action": "everything", "user_id": "u-1" })),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A write the browser marks cross-site.
    let mut cross = request(
        Method::POST,
        uri,
        Some(serde_json::json!({ "challenge": "1603EBDF1C8A2E72", "checksum": "9D70" })),
    );
    cross
        .headers_mut()
        .insert("sec-fetch-site", "cross-site".parse().unwrap());
    let (status, _, json) = call(&router, cross).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{json}");
    // Too large.
    let (status, _, _) = call(
        &router,
        request(
            Method::POST,
            uri,
            Some(serde_json::json!({ "challenge": "0".repeat(64 * 1024) })),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(seen.methods().is_empty(), "{:?}", seen.methods());
}

#[tokio::test]
async fn unknown_paths_wrong_methods_and_grpc_fallback() {
    let (router, _) = console();
    let (status, headers, json) = call(&router, request(Method::GET, "/api/v1/nope", None)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(json["error"]["code"], "NOT_FOUND");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    let (status, headers, _) = call(&router, request(Method::GET, "/nope.html", None)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    let (status, headers, _) = call(
        &router,
        request(
            Method::GET,
            "/api/v1/users/u-1/cards/c-1/offline-response",
            None,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers[header::ALLOW], "POST");
    let (status, _, _) = call(&router, request(Method::DELETE, "/", None)).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    let mut grpc = request(Method::POST, "/cms.nope.v1.Nope/Call", None);
    grpc.headers_mut()
        .insert(header::CONTENT_TYPE, "application/grpc".parse().unwrap());
    let (status, headers, _) = call(&router, grpc).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["grpc-status"], "12");
}

#[tokio::test]
async fn pages_are_embedded_with_their_types_and_policy() {
    let (router, _) = console();
    for (path, content_type, marker) in [
        ("/", "text/html; charset=utf-8", "<main"),
        ("/console.js", "text/javascript; charset=utf-8", "api/v1"),
        ("/code.js", "text/javascript; charset=utf-8", "0x1021"),
        ("/console.css", "text/css; charset=utf-8", "@media"),
    ] {
        let response = router
            .clone()
            .oneshot(request(Method::GET, path, None))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let headers = response.headers().clone();
        assert_eq!(headers[header::CONTENT_TYPE], content_type, "{path}");
        assert_eq!(headers[header::CACHE_CONTROL], "no-cache", "{path}");
        assert!(
            headers.contains_key(header::CONTENT_SECURITY_POLICY),
            "{path}"
        );
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(text.contains(marker), "{path} lacks {marker}");
        // The CSP allows no inline code: the pages must not need any.
        if path == "/" {
            assert!(
                !text.contains("<script>")
                    && !text.contains(" style=")
                    && !text.contains("onclick")
            );
        }
    }
}

#[tokio::test]
async fn approvals_round_trip() {
    let (router, seen) = console();
    let (status, _, json) = call(
        &router,
        request(
            Method::POST,
            "/api/v1/approvals",
            Some(serde_json::json!({
                "action": "offline-response",
                "user_id": "u-1",
                "credential_id": "c-1",
                "reason": "caller verified by phone",
            })),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["approval"]["state"], "pending");
    assert_eq!(json["approval"]["action"], "offline-response");
    let (status, _, json) = call(
        &router,
        request(Method::GET, "/api/v1/approvals?include_own=true", None),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["approvals"][0]["id"], "ap-1");
    let (status, _, json) = call(
        &router,
        request(
            Method::POST,
            "/api/v1/approvals/ap-1/reject",
            Some(serde_json::json!({"reason": "no ticket"})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["approval"]["state"], "rejected");
    let (status, _, _) = call(
        &router,
        request(Method::GET, "/api/v1/approvals?bogus=1", None),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        seen.methods(),
        ["RequestApproval", "ListPendingApprovals", "Reject"]
    );
}

#[tokio::test]
async fn puk_read_out_and_cancel_reach_the_workflow() {
    let (router, seen) = console();
    let (status, headers, json) = call(
        &router,
        request(
            Method::POST,
            "/api/v1/users/u-1/cards/c-piv/piv-puk",
            Some(serde_json::json!({ "ticket_reference": "INC-9" })),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["puk"], "12345678");
    assert_eq!(json["puk_code"]["groups"], "3132 3334 3536 3738");
    assert_eq!(json["exposed"], true);
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    // A write without parameters is still JSON: `{}`, nothing else.
    let (status, _, _) = call(
        &router,
        request(Method::POST, "/api/v1/approvals/ap-1/cancel", None),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, json) = call(
        &router,
        request(
            Method::POST,
            "/api/v1/approvals/ap-1/cancel",
            Some(serde_json::json!({})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["approval"]["state"], "cancelled");
    let (status, _, json) = call(
        &router,
        request(
            Method::POST,
            "/api/v1/cards/c-1/status",
            Some(serde_json::json!({ "status": "stolen" })),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["error"]["field"], "status");
    assert_eq!(seen.methods(), ["ReadPivPuk", "CancelApproval"]);
}
