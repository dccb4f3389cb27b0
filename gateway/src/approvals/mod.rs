//! ApprovalService: dual control. An operator requests approval for an action on a user's
//! card; a different operator holding one of the template's approver roles, with the user and
//! card in scope, approves or rejects it; the approval is then good for one use by the
//! requester, for that user, card and action, until it expires. Everything lives in the
//! database, so any replica can take any step.

pub mod store;

use std::collections::HashMap;
use std::sync::Arc;

use cms_proto::common::v1::{ErrorReason, PageResponse};
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::approval_service_server::ApprovalService;
use cms_proto::gateway::v1::{ApprovalState, HelpdeskAction};
use sea_orm::{ActiveModelTrait, Set};
use tonic::{Code, Request, Response, Status};

use crate::Error;
use crate::authz::org_unit_in;
use crate::db::{self, approval};
use crate::helpdesk::policy;
use crate::helpdesk::{Call, Workflow};
use crate::roles::Action;

const MAX_TEXT: usize = 500;
const MAX_LISTED: u64 = 1000;
const DEFAULT_PAGE: usize = 50;

/// The ApprovalService.
#[derive(Clone)]
pub struct Approvals {
    pub workflow: Arc<Workflow>,
}

impl Approvals {
    pub fn new(workflow: Arc<Workflow>) -> Self {
        Self { workflow }
    }
}

fn text(field: &str, value: &str, required: bool) -> Result<String, Error> {
    let value = value.trim();
    if required && value.is_empty() {
        return Err(Error::invalid(field, format!("{field} is required")));
    }
    if value.len() > MAX_TEXT {
        return Err(Error::invalid(
            field,
            format!("{field} is longer than {MAX_TEXT} bytes"),
        ));
    }
    Ok(value.to_owned())
}

fn not_pending(row: &approval::Model, now: i64) -> Error {
    let state = store::state_now(row, now);
    let name = state
        .as_str_name()
        .trim_start_matches("APPROVAL_STATE_")
        .to_lowercase();
    Error::refused(
        Code::FailedPrecondition,
        ErrorReason::VersionConflict,
        format!("approval {} is {name}, not pending", row.id),
    )
}

async fn request(
    wf: &Workflow,
    call: &mut Call,
    req: gw::RequestApprovalRequest,
) -> Result<gw::RequestApprovalResponse, Error> {
    let action = HelpdeskAction::try_from(req.action).unwrap_or(HelpdeskAction::Unspecified);
    call.decision.action = policy::action_name(action);
    if !matches!(
        action,
        HelpdeskAction::OfflineResponse
            | HelpdeskAction::ReadPivPuk
            | HelpdeskAction::OnlineUnblock
    ) {
        return Err(Error::invalid(
            "action",
            "approval is for OFFLINE_RESPONSE, READ_PIV_PUK or ONLINE_UNBLOCK",
        ));
    }
    let reason = text("reason", &req.reason, true)?;
    let ticket = text("ticket_reference", &req.ticket_reference, false)?;
    let card = policy::load(wf, call, &req.user_id, &req.credential_id).await?;
    if let Err(denial) = policy::check(&call.actor, &card, action) {
        call.decision.rule = denial.rule;
        return Err(denial.error);
    }
    call.decision.rule = "approval requested";
    let now = db::now_ms();
    let ttl = policy::approval_ttl(&card.operator_policy(), &wf.settings);
    let pending_ms = i64::try_from(wf.settings.approval_ttl_ms).unwrap_or(i64::MAX / 2);
    let row = approval::ActiveModel {
        id: Set(uuid::Uuid::now_v7().to_string()),
        action: Set(action as i32),
        state: Set(ApprovalState::Pending as i32),
        requester_id: Set(call.actor.username().to_owned()),
        requester_name: Set(call.actor.display_name().to_owned()),
        user_id: Set(card.user.id.clone()),
        user_display_name: Set(card.user.display_name.clone()),
        user_org_unit: Set(card.user.org_unit.clone()),
        credential_id: Set(card.credential.id.clone()),
        card_serial: Set(card.credential.serial.clone()),
        template_id: Set(card.credential.template_id.clone()),
        reason: Set(reason),
        ticket_reference: Set(ticket),
        created_at: Set(now),
        expires_at: Set(now.saturating_add(pending_ms)),
        approval_ttl_ms: Set(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2)),
        decided_by: Set(String::new()),
        decided_by_name: Set(String::new()),
        decided_at: Set(None),
        decision_comment: Set(String::new()),
        used_at: Set(None),
    }
    .insert(&wf.db)
    .await?;
    call.decision.approval_id = row.id.clone();
    Ok(gw::RequestApprovalResponse {
        approval: Some(store::to_proto(&row, now)),
    })
}

/// Whether the caller may see an approval: its requester, or an operator with the user and
/// template in scope.
fn may_see(call: &Call, row: &approval::Model) -> bool {
    row.requester_id == call.actor.username()
        || (org_unit_in(&row.user_org_unit, call.actor.org_units())
            && call.actor.covers_template(&row.template_id))
}

async fn get(
    wf: &Workflow,
    call: &mut Call,
    req: gw::GetApprovalRequest,
) -> Result<gw::GetApprovalResponse, Error> {
    call.actor.require(Action::ViewHelpdesk)?;
    policy::require_id("id", &req.id)?;
    call.decision.approval_id = req.id.clone();
    let row = store::get(&wf.db, &req.id).await?;
    call.decision.rule = "scope";
    if !may_see(call, &row) {
        return Err(Error::not_found(format!("approval {} not found", req.id)));
    }
    Ok(gw::GetApprovalResponse {
        approval: Some(store::to_proto(&row, db::now_ms())),
    })
}

async fn list(
    wf: &Workflow,
    call: &mut Call,
    req: gw::ListPendingApprovalsRequest,
) -> Result<gw::ListPendingApprovalsResponse, Error> {
    call.decision.rule = "roles";
    call.actor.require(Action::ViewHelpdesk)?;
    let now = db::now_ms();
    let rows = store::pending(&wf.db, now, 0, MAX_LISTED).await?;
    let me = call.actor.username().to_owned();
    // Others' requests are listed to those who may decide them: within scope, holding one
    // of the approver roles of the card's template (read once per template).
    let mut decides: HashMap<String, bool> = HashMap::new();
    let mut visible = Vec::new();
    for row in rows {
        let show = if row.requester_id == me {
            req.include_own
        } else if !may_see(call, &row) {
            false
        } else if let Some(known) = decides.get(&row.template_id) {
            *known
        } else {
            let may = match policy::template(wf, call, &row.template_id, 0).await {
                Ok(template) => {
                    let policy = template
                        .spec
                        .and_then(|s| s.unblock_policy)
                        .and_then(|p| p.operator_policy)
                        .unwrap_or_default();
                    call.actor.holds_any(&policy::approver_roles(&policy))
                }
                Err(err) => {
                    tracing::warn!(template = %row.template_id, error = %err, "cannot read an approval's template");
                    false
                }
            };
            decides.insert(row.template_id.clone(), may);
            may
        };
        if show {
            visible.push(row);
        }
    }
    let page = req.page.unwrap_or_default();
    let offset: usize = if page.page_token.is_empty() {
        0
    } else {
        page.page_token
            .parse()
            .map_err(|_| Error::invalid("page.page_token", "not a page token of this list"))?
    };
    let size = match page.page_size {
        0 => DEFAULT_PAGE,
        n => usize::try_from(n).unwrap_or(DEFAULT_PAGE).min(200),
    };
    let total = visible.len();
    let end = offset.saturating_add(size).min(total);
    let approvals = visible
        .get(offset.min(total)..end)
        .unwrap_or_default()
        .iter()
        .map(|row| store::to_proto(row, now))
        .collect();
    Ok(gw::ListPendingApprovalsResponse {
        approvals,
        page: Some(PageResponse {
            next_page_token: if end < total {
                end.to_string()
            } else {
                String::new()
            },
            total_estimate: u64::try_from(total).unwrap_or_default(),
        }),
    })
}

/// Approves or rejects: a different operator, with one of the template's approver roles and
/// the user and card in scope.
async fn decide(
    wf: &Workflow,
    call: &mut Call,
    id: &str,
    approve: bool,
    comment: String,
) -> Result<gw::Approval, Error> {
    policy::require_id("id", id)?;
    call.decision.approval_id = id.to_owned();
    let row = store::get(&wf.db, id).await?;
    call.decision.action = if approve { "approve" } else { "reject" };
    let now = db::now_ms();
    if store::state_now(&row, now) != ApprovalState::Pending {
        call.decision.rule = "approval state";
        return Err(not_pending(&row, now));
    }
    call.decision.rule = "second operator";
    if row.requester_id == call.actor.username() {
        return Err(Error::denied(format!(
            "operator {:?} requested approval {id} and may not decide it: a different operator must",
            call.actor.username()
        )));
    }
    let card = policy::load(wf, call, &row.user_id, &row.credential_id).await?;
    let roles = policy::approver_roles(&card.operator_policy());
    call.decision.rule = "operator_policy.approver_roles";
    if !call.actor.holds_any(&roles) {
        return Err(Error::denied(format!(
            "operator {:?} may not decide approvals for cards of template {:?}: that needs the {} role",
            call.actor.username(),
            card.template_name(),
            roles.join(" or ")
        )));
    }
    let (to, expires_at) = if approve {
        (
            ApprovalState::Approved,
            now.saturating_add(row.approval_ttl_ms),
        )
    } else {
        (ApprovalState::Rejected, row.expires_at)
    };
    let changed = store::transition(
        &wf.db,
        id,
        ApprovalState::Pending,
        to,
        vec![
            (approval::Column::ExpiresAt, expires_at.into()),
            (
                approval::Column::DecidedBy,
                call.actor.username().to_owned().into(),
            ),
            (
                approval::Column::DecidedByName,
                call.actor.display_name().to_owned().into(),
            ),
            (approval::Column::DecidedAt, now.into()),
            (approval::Column::DecisionComment, comment.into()),
        ],
    )
    .await?;
    let row = store::get(&wf.db, id).await?;
    if !changed {
        call.decision.rule = "approval state";
        return Err(not_pending(&row, db::now_ms()));
    }
    Ok(store::to_proto(&row, db::now_ms()))
}

async fn cancel(
    wf: &Workflow,
    call: &mut Call,
    req: gw::CancelApprovalRequest,
) -> Result<gw::CancelApprovalResponse, Error> {
    policy::require_id("id", &req.id)?;
    call.decision.approval_id = req.id.clone();
    let row = store::get(&wf.db, &req.id).await?;
    call.decision.rule = "requester";
    if row.requester_id != call.actor.username() {
        return Err(Error::denied(format!(
            "only the requester may cancel approval {}",
            req.id
        )));
    }
    let mut cancelled = false;
    for from in [ApprovalState::Pending, ApprovalState::Approved] {
        if store::transition(&wf.db, &req.id, from, ApprovalState::Cancelled, Vec::new()).await? {
            cancelled = true;
            break;
        }
    }
    let row = store::get(&wf.db, &req.id).await?;
    if !cancelled {
        return Err(not_pending(&row, db::now_ms()));
    }
    Ok(gw::CancelApprovalResponse {
        approval: Some(store::to_proto(&row, db::now_ms())),
    })
}

#[tonic::async_trait]
impl ApprovalService for Approvals {
    async fn request_approval(
        &self,
        r: Request<gw::RequestApprovalRequest>,
    ) -> Result<Response<gw::RequestApprovalResponse>, Status> {
        let wf = &self.workflow;
        let mut call = wf.begin("RequestApproval", "request_approval", &r).await?;
        let outcome = request(wf, &mut call, r.into_inner()).await;
        wf.finish(&call, outcome.map(Response::new)).await
    }

    async fn get_approval(
        &self,
        r: Request<gw::GetApprovalRequest>,
    ) -> Result<Response<gw::GetApprovalResponse>, Status> {
        let wf = &self.workflow;
        let mut call = wf.begin("GetApproval", "get_approval", &r).await?;
        let outcome = get(wf, &mut call, r.into_inner()).await;
        wf.finish(&call, outcome.map(Response::new)).await
    }

    async fn list_pending_approvals(
        &self,
        r: Request<gw::ListPendingApprovalsRequest>,
    ) -> Result<Response<gw::ListPendingApprovalsResponse>, Status> {
        let wf = &self.workflow;
        let mut call = wf
            .begin("ListPendingApprovals", "list_approvals", &r)
            .await?;
        let outcome = list(wf, &mut call, r.into_inner()).await;
        wf.finish(&call, outcome.map(Response::new)).await
    }

    async fn approve(
        &self,
        r: Request<gw::ApproveRequest>,
    ) -> Result<Response<gw::ApproveResponse>, Status> {
        let wf = &self.workflow;
        let mut call = wf.begin("Approve", "approve", &r).await?;
        let req = r.into_inner();
        let outcome = match text("comment", &req.comment, false) {
            Ok(comment) => decide(wf, &mut call, &req.id, true, comment).await,
            Err(err) => Err(err),
        };
        let outcome = outcome.map(|a| Response::new(gw::ApproveResponse { approval: Some(a) }));
        wf.finish(&call, outcome).await
    }

    async fn reject(
        &self,
        r: Request<gw::RejectRequest>,
    ) -> Result<Response<gw::RejectResponse>, Status> {
        let wf = &self.workflow;
        let mut call = wf.begin("Reject", "reject", &r).await?;
        let req = r.into_inner();
        let outcome = match text("reason", &req.reason, true) {
            Ok(reason) => decide(wf, &mut call, &req.id, false, reason).await,
            Err(err) => Err(err),
        };
        let outcome = outcome.map(|a| Response::new(gw::RejectResponse { approval: Some(a) }));
        wf.finish(&call, outcome).await
    }

    async fn cancel_approval(
        &self,
        r: Request<gw::CancelApprovalRequest>,
    ) -> Result<Response<gw::CancelApprovalResponse>, Status> {
        let wf = &self.workflow;
        let mut call = wf.begin("CancelApproval", "cancel_approval", &r).await?;
        let outcome = cancel(wf, &mut call, r.into_inner()).await;
        wf.finish(&call, outcome.map(Response::new)).await
    }
}
