//! UpdateCardStatus: the helpdesk reports a card lost, revoked or blocked; reinstating a card
//! (ACTIVE) is for admins.

use cms_proto::common::v1::{AuthContext, Flow};
use cms_proto::directory::v1 as dir;
use cms_proto::directory::v1::CredentialStatus;
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::HelpdeskAction;

use super::policy;
use super::{Call, Workflow};
use crate::Error;
use crate::roles::{Action, Role};

pub async fn update(
    wf: &Workflow,
    call: &mut Call,
    req: gw::UpdateCardStatusRequest,
) -> Result<gw::UpdateCardStatusResponse, Error> {
    call.decision.rule = "roles";
    call.actor.require(Action::ChangeCardStatus)?;
    policy::require_id("credential_id", &req.credential_id)?;
    let status = CredentialStatus::try_from(req.status).unwrap_or(CredentialStatus::Unspecified);
    match status {
        CredentialStatus::Lost | CredentialStatus::Revoked | CredentialStatus::Blocked => {}
        CredentialStatus::Active if call.actor.has_role(Role::Admin) => {}
        CredentialStatus::Active => {
            return Err(Error::denied(format!(
                "operator {:?} may not reinstate a card: that needs the admin role",
                call.actor.username()
            )));
        }
        CredentialStatus::Unspecified => {
            return Err(Error::invalid(
                "status",
                "status must be LOST, REVOKED, BLOCKED or ACTIVE",
            ));
        }
    }
    if req.reason.trim().is_empty() {
        return Err(Error::invalid("reason", "a reason is required"));
    }
    // The card's owner decides the scope.
    let mut directory = wf.directory.clone();
    let credential = call
        .budget
        .call(
            "directory",
            directory.get_credential(call.budget.request(dir::GetCredentialRequest {
                id: req.credential_id.clone(),
            })),
        )
        .await?
        .credential
        .ok_or_else(|| Error::not_found(format!("card {} not found", req.credential_id)))?;
    let card = policy::load(wf, call, &credential.user_id, &credential.id).await?;
    if let Err(denial) = policy::check(&call.actor, &card, HelpdeskAction::UpdateStatus) {
        call.decision.rule = denial.rule;
        return Err(denial.error);
    }
    call.decision.rule = "directory";
    let auth = AuthContext {
        actor_kind: call.actor.actor_kind() as i32,
        actor_id: call.actor.username().to_owned(),
        on_behalf_of_user_id: card.user.id.clone(),
        card_id: card.credential.card_id.clone(),
        flow: Flow::Administration as i32,
        request_id: call.budget.request_id.clone(),
        template_id: card.template.id.clone(),
        template_version: card.template.version,
        peer_identity: call.actor.peer.clone(),
        ticket_reference: req.ticket_reference.chars().take(128).collect(),
        ..Default::default()
    };
    let updated = call
        .budget
        .call(
            "directory",
            directory.update_credential_status(call.budget.request(
                dir::UpdateCredentialStatusRequest {
                    id: card.credential.id.clone(),
                    status: status as i32,
                    reason: req.reason.chars().take(500).collect(),
                    auth: Some(auth),
                },
            )),
        )
        .await?;
    Ok(gw::UpdateCardStatusResponse {
        credential: updated.credential,
    })
}
