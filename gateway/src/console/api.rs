//! The JSON API under `/api/v1`: each handler turns the HTTP request into the same
//! `tonic::Request` the gRPC transport would build (the connection's extensions, so the
//! verified peer identity, come along), calls the same HelpdeskService / ApprovalService /
//! AdminService method, and maps the answer or the `tonic::Status` to HTTP.

use std::fmt;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{Extensions, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use cms_proto::common::v1::{Flow, TypedCode};
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::approval_service_server::ApprovalService;
use cms_proto::gateway::v1::helpdesk_service_server::HelpdeskService;
use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tonic::metadata::MetadataMap;

use super::error::ApiError;
use super::views::{self, PageQuery};

/// AdminService.QueryAudit, the one AdminService method the console uses (role-checked
/// there, like every AdminService call).
pub type AuditQuery = Arc<
    dyn Fn(
            tonic::Request<gw::QueryAuditRequest>,
        )
            -> BoxFuture<'static, Result<tonic::Response<gw::QueryAuditResponse>, tonic::Status>>
        + Send
        + Sync,
>;

/// The workflow implementations the console calls: the very objects the gRPC servers wrap.
#[derive(Clone)]
pub struct Services {
    pub helpdesk: Arc<dyn HelpdeskService>,
    pub approvals: Arc<dyn ApprovalService>,
    pub audit: AuditQuery,
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The gRPC request the same call would have produced: no metadata (browser headers and
/// cookies stay out of the workflow), the connection's extensions (the verified
/// [`cms_kit::PeerIdentity`] among them).
fn grpc<T>(extensions: Extensions, message: T) -> tonic::Request<T> {
    tonic::Request::from_parts(MetadataMap::new(), extensions, message)
}

/// A JSON body whose rejection is our JSON error. The message is generic on purpose: serde's
/// would quote the offending value, which may be a secret typed in the wrong field.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::bad_request(
                "",
                "send the request body as JSON (Content-Type: application/json)",
            )),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::bad_request("", "the request body is too large"))
            }
            Err(_) => Err(ApiError::bad_request(
                "",
                "the request body is not the JSON this endpoint takes",
            )),
        }
    }
}

/// Query parameters whose rejection is our JSON error.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| Self(value))
            .map_err(|_: QueryRejection| {
                ApiError::bad_request(
                    "",
                    "the query parameters are not the ones this endpoint takes",
                )
            })
    }
}

pub fn routes(services: Services) -> Router {
    Router::new()
        .route("/whoami", get(who_am_i))
        .route("/users", get(search_users))
        .route("/users/{user_id}", get(user_cards))
        .route(
            "/users/{user_id}/cards/{credential_id}/offline-response",
            post(offline_response),
        )
        .route(
            "/users/{user_id}/cards/{credential_id}/piv-puk",
            post(piv_puk),
        )
        .route("/users/{user_id}/one-time-code", post(one_time_code))
        .route("/cards/{credential_id}/status", post(card_status))
        .route("/approvals", get(list_approvals).post(request_approval))
        .route("/approvals/{id}", get(get_approval))
        .route("/approvals/{id}/approve", post(approve))
        .route("/approvals/{id}/reject", post(reject))
        .route("/approvals/{id}/cancel", post(cancel_approval))
        .route("/audit", get(audit))
        .fallback(|| async { ApiError::not_found() })
        .with_state(services)
}

async fn who_am_i(State(s): State<Services>, ext: Extensions) -> ApiResult<views::WhoAmIView> {
    let r = s.helpdesk.who_am_i(grpc(ext, gw::WhoAmIRequest {})).await?;
    Ok(Json(r.into_inner().into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchQuery {
    #[serde(default)]
    query: String,
    #[serde(default)]
    page_size: u32,
    #[serde(default)]
    page_token: String,
}

async fn search_users(
    State(s): State<Services>,
    ext: Extensions,
    Params(q): Params<SearchQuery>,
) -> ApiResult<views::SearchView> {
    let request = gw::SearchUsersRequest {
        query: q.query,
        page: PageQuery {
            page_size: q.page_size,
            page_token: q.page_token,
        }
        .to_proto(),
        statuses: Vec::new(),
    };
    let r = s.helpdesk.search_users(grpc(ext, request)).await?;
    Ok(Json(r.into_inner().into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CardsQuery {
    #[serde(default)]
    include_inactive: bool,
}

async fn user_cards(
    State(s): State<Services>,
    ext: Extensions,
    Path(user_id): Path<String>,
    Params(q): Params<CardsQuery>,
) -> ApiResult<views::UserCardsView> {
    let request = gw::GetUserCardsRequest {
        user_id,
        include_inactive: q.include_inactive,
    };
    let r = s.helpdesk.get_user_cards(grpc(ext, request)).await?;
    Ok(Json(r.into_inner().into()))
}

/// What the unblock tab sends. The challenge is the user's card secret of the moment: never
/// printed (Debug is redacted).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OfflineBody {
    challenge: String,
    #[serde(default)]
    checksum: String,
    /// `offline-helpdesk` (default) or `windows-unblock-screen`.
    #[serde(default)]
    flow: String,
    #[serde(default)]
    approval_id: String,
    #[serde(default)]
    ticket_reference: String,
}

impl fmt::Debug for OfflineBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OfflineBody")
            .field("flow", &self.flow)
            .field("approval_id", &self.approval_id)
            .finish_non_exhaustive()
    }
}

async fn offline_response(
    State(s): State<Services>,
    ext: Extensions,
    Path((user_id, credential_id)): Path<(String, String)>,
    Body(body): Body<OfflineBody>,
) -> ApiResult<views::OfflineResponseView> {
    let flow = if body.flow.is_empty() {
        Flow::OfflineHelpdesk
    } else {
        match views::parse_flow(&body.flow) {
            Some(flow @ (Flow::OfflineHelpdesk | Flow::WindowsUnblockScreen)) => flow,
            _ => {
                return Err(ApiError::bad_request(
                    "flow",
                    "flow must be offline-helpdesk or windows-unblock-screen",
                ));
            }
        }
    };
    let request = gw::ComputeOfflineResponseRequest {
        user_id,
        credential_id,
        challenge: Some(TypedCode {
            hex: body.challenge,
            checksum: body.checksum,
        }),
        flow: flow as i32,
        approval_id: body.approval_id,
        ticket_reference: body.ticket_reference,
    };
    let r = s
        .helpdesk
        .compute_offline_response(grpc(ext, request))
        .await?;
    Ok(Json(r.into_inner().into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovedActionBody {
    #[serde(default)]
    approval_id: String,
    #[serde(default)]
    ticket_reference: String,
}

async fn piv_puk(
    State(s): State<Services>,
    ext: Extensions,
    Path((user_id, credential_id)): Path<(String, String)>,
    Body(body): Body<ApprovedActionBody>,
) -> ApiResult<views::PivPukView> {
    let request = gw::ReadPivPukRequest {
        user_id,
        credential_id,
        approval_id: body.approval_id,
        ticket_reference: body.ticket_reference,
    };
    let r = s.helpdesk.read_piv_puk(grpc(ext, request)).await?;
    Ok(Json(r.into_inner().into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OneTimeCodeBody {
    #[serde(default)]
    credential_id: String,
    #[serde(default)]
    approval_id: String,
    #[serde(default)]
    ticket_reference: String,
}

async fn one_time_code(
    State(s): State<Services>,
    ext: Extensions,
    Path(user_id): Path<String>,
    Body(body): Body<OneTimeCodeBody>,
) -> ApiResult<views::OneTimeCodeView> {
    let request = gw::IssueOneTimeCodeRequest {
        user_id,
        credential_id: body.credential_id,
        ticket_reference: body.ticket_reference,
        approval_id: body.approval_id,
    };
    let r = s.helpdesk.issue_one_time_code(grpc(ext, request)).await?;
    Ok(Json(r.into_inner().into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusBody {
    /// `lost`, `revoked`, `blocked` or `active`.
    status: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    ticket_reference: String,
}

async fn card_status(
    State(s): State<Services>,
    ext: Extensions,
    Path(credential_id): Path<String>,
    Body(body): Body<StatusBody>,
) -> ApiResult<views::CredentialResultView> {
    let status = views::parse_credential_status(&body.status).ok_or_else(|| {
        ApiError::bad_request("status", "status must be active, blocked, revoked or lost")
    })?;
    let request = gw::UpdateCardStatusRequest {
        credential_id,
        status: status as i32,
        reason: body.reason,
        ticket_reference: body.ticket_reference,
    };
    let r = s.helpdesk.update_card_status(grpc(ext, request)).await?;
    Ok(Json(views::CredentialResultView {
        credential: r.into_inner().credential.map(Into::into),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalsQuery {
    #[serde(default)]
    include_own: bool,
    #[serde(default)]
    page_size: u32,
    #[serde(default)]
    page_token: String,
}

async fn list_approvals(
    State(s): State<Services>,
    ext: Extensions,
    Params(q): Params<ApprovalsQuery>,
) -> ApiResult<views::ApprovalListView> {
    let request = gw::ListPendingApprovalsRequest {
        page: PageQuery {
            page_size: q.page_size,
            page_token: q.page_token,
        }
        .to_proto(),
        include_own: q.include_own,
    };
    let r = s
        .approvals
        .list_pending_approvals(grpc(ext, request))
        .await?;
    Ok(Json(r.into_inner().into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalRequestBody {
    /// `offline-response`, `read-piv-puk`, `issue-one-time-code`, …
    action: String,
    user_id: String,
    #[serde(default)]
    credential_id: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    ticket_reference: String,
}

async fn request_approval(
    State(s): State<Services>,
    ext: Extensions,
    Body(body): Body<ApprovalRequestBody>,
) -> ApiResult<views::OneApprovalView> {
    let action = views::parse_action(&body.action).ok_or_else(|| {
        ApiError::bad_request(
            "action",
            "action must be offline-response, online-unblock, read-piv-puk, issue-one-time-code or update-status",
        )
    })?;
    let request = gw::RequestApprovalRequest {
        action: action as i32,
        user_id: body.user_id,
        credential_id: body.credential_id,
        reason: body.reason,
        ticket_reference: body.ticket_reference,
    };
    let r = s.approvals.request_approval(grpc(ext, request)).await?;
    Ok(Json(r.into_inner().approval.into()))
}

async fn get_approval(
    State(s): State<Services>,
    ext: Extensions,
    Path(id): Path<String>,
) -> ApiResult<views::OneApprovalView> {
    let r = s
        .approvals
        .get_approval(grpc(ext, gw::GetApprovalRequest { id }))
        .await?;
    Ok(Json(r.into_inner().approval.into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommentBody {
    #[serde(default)]
    comment: String,
}

async fn approve(
    State(s): State<Services>,
    ext: Extensions,
    Path(id): Path<String>,
    Body(body): Body<CommentBody>,
) -> ApiResult<views::OneApprovalView> {
    let request = gw::ApproveRequest {
        id,
        comment: body.comment,
    };
    let r = s.approvals.approve(grpc(ext, request)).await?;
    Ok(Json(r.into_inner().approval.into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RejectBody {
    #[serde(default)]
    reason: String,
}

async fn reject(
    State(s): State<Services>,
    ext: Extensions,
    Path(id): Path<String>,
    Body(body): Body<RejectBody>,
) -> ApiResult<views::OneApprovalView> {
    let request = gw::RejectRequest {
        id,
        reason: body.reason,
    };
    let r = s.approvals.reject(grpc(ext, request)).await?;
    Ok(Json(r.into_inner().approval.into()))
}

/// A write without parameters still sends `{}`: every write is JSON (see the module docs of
/// `console`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyBody {}

async fn cancel_approval(
    State(s): State<Services>,
    ext: Extensions,
    Path(id): Path<String>,
    Body(EmptyBody {}): Body<EmptyBody>,
) -> ApiResult<views::OneApprovalView> {
    let r = s
        .approvals
        .cancel_approval(grpc(ext, gw::CancelApprovalRequest { id }))
        .await?;
    Ok(Json(r.into_inner().approval.into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQueryParams {
    #[serde(default)]
    user_id: String,
    #[serde(default)]
    actor_id: String,
    #[serde(default)]
    request_id: String,
    #[serde(default)]
    from_sequence: u64,
    #[serde(default)]
    descending: bool,
    #[serde(default)]
    page_size: u32,
    #[serde(default)]
    page_token: String,
}

async fn audit(
    State(s): State<Services>,
    ext: Extensions,
    Params(q): Params<AuditQueryParams>,
) -> ApiResult<views::AuditView> {
    let request = gw::QueryAuditRequest {
        user_id: q.user_id,
        actor_id: q.actor_id,
        request_id: q.request_id,
        from_sequence: q.from_sequence,
        descending: q.descending,
        page: PageQuery {
            page_size: q.page_size,
            page_token: q.page_token,
        }
        .to_proto(),
        ..Default::default()
    };
    let r = (s.audit)(grpc(ext, request)).await?;
    Ok(Json(r.into_inner().into()))
}
