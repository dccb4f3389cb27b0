//! ReadPivPuk: offline PIV. A PIV card's PIN is reset only with its PUK, so the helpdesk reads
//! the card's current PUK to the user (with its checksum); custody marks that PUK version
//! exposed, and the agent rotates it at the card's next online contact.

use cms_cardcrypto::Zeroizing;
use cms_proto::common::v1::{AuthContext, ErrorReason, Flow, TypedCode};
use cms_proto::custody::v1::{PukPurpose, ReleasePivPukRequest};
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::HelpdeskAction;
use tonic::Code;

use super::policy;
use super::{Call, Workflow};
use crate::Error;

/// PIV allows 6 to 8 characters; 8 when the template says nothing.
const DEFAULT_PUK_LENGTH: u32 = 8;

pub async fn read(
    wf: &Workflow,
    call: &mut Call,
    req: gw::ReadPivPukRequest,
) -> Result<gw::ReadPivPukResponse, Error> {
    let card = policy::load(wf, call, &req.user_id, &req.credential_id).await?;
    if let Err(denial) = policy::check(&call.actor, &card, HelpdeskAction::ReadPivPuk) {
        call.decision.rule = denial.rule;
        return Err(denial.error);
    }
    let puk_config = card
        .template
        .spec
        .as_ref()
        .and_then(|s| s.puk.clone())
        .unwrap_or_default();
    if puk_config.master_key_reference.is_empty() {
        call.decision.rule = "puk.master_key_reference";
        return Err(Error::refused(
            Code::FailedPrecondition,
            ErrorReason::FlowNotAllowed,
            format!(
                "template {:?} has no PUK configuration",
                card.template_name()
            ),
        ));
    }
    policy::consume_approval(
        wf,
        call,
        &card,
        HelpdeskAction::ReadPivPuk,
        &req.approval_id,
    )
    .await?;
    call.decision.rule = "custody";
    let auth = AuthContext {
        actor_kind: call.actor.actor_kind() as i32,
        actor_id: call.actor.username().to_owned(),
        on_behalf_of_user_id: card.user.id.clone(),
        card_id: card.credential.card_id.clone(),
        flow: Flow::OfflineHelpdesk as i32,
        approval_id: call.decision.approval_id.clone(),
        request_id: call.budget.request_id.clone(),
        template_id: card.template.id.clone(),
        template_version: card.template.version,
        peer_identity: call.actor.peer.clone(),
        ticket_reference: req.ticket_reference.chars().take(128).collect(),
        session_id: String::new(),
    };
    let message = ReleasePivPukRequest {
        card_id: card.credential.card_id.clone(),
        auth: Some(auth),
        purpose: PukPurpose::OfflineHelpdesk as i32,
        session_id: String::new(),
        master_key_reference: puk_config.master_key_reference.clone(),
        master_key_version: card.credential.master_key_version,
        puk_version: card.credential.puk_version,
        puk_length: if puk_config.length == 0 {
            DEFAULT_PUK_LENGTH
        } else {
            puk_config.length
        },
    };
    let mut custody = wf.custody.clone();
    let answer = call
        .budget
        .call(
            "custody",
            custody.release_piv_puk(call.budget.request(message)),
        )
        .await?;
    let puk = Zeroizing::new(answer.puk);
    Ok(gw::ReadPivPukResponse {
        puk: String::from_utf8_lossy(&puk).into_owned(),
        puk_code: Some(TypedCode {
            hex: cms_cardcrypto::format_groups(&puk),
            checksum: answer.puk_checksum,
        }),
        puk_version: answer.puk_version,
        exposed: true,
        request_id: call.budget.request_id.clone(),
    })
}
