//! ComputeOfflineResponse: the operator types the challenge the user reads from the card, and
//! reads back the response (the "cryptogram") with its checksum.
//!
//! Order matters: the typed challenge is parsed and its checksum checked first (a typo never
//! reaches custody, where it would cost a request and an audit record, or the card, where a
//! wrong response costs an admin-key try); then the card, its template and the operator's
//! role and scope; then the rate limits and the approval; custody last, with the full
//! authorization context.

use std::time::Duration;

use cms_cardcrypto::CodeError;
use cms_cardcrypto::Zeroizing;
use cms_kit::error_details::Refusal;
use cms_proto::common::v1::{AuthContext, ErrorReason, Flow, KeyAlgorithm, TypedCode};
use cms_proto::custody::v1::ComputeCryptogramRequest;
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::HelpdeskAction;
use cms_proto::template::v1::{RateLimit, RateLimitScope};
use tonic::{Code, Request, Response, Status};

use super::policy::{self, Card};
use super::{Call, Workflow};
use crate::Error;

/// Challenge lengths in bytes: 3DES cards 8, AES cards 16.
const CHALLENGE_LENGTHS: [usize; 2] = [8, 16];

pub async fn compute(
    wf: &Workflow,
    request: Request<gw::ComputeOfflineResponseRequest>,
) -> Result<Response<gw::ComputeOfflineResponseResponse>, Status> {
    let mut call = wf
        .begin("ComputeOfflineResponse", "offline_response", &request)
        .await?;
    let outcome = run(wf, &mut call, request.into_inner()).await;
    wf.finish(&call, outcome.map(Response::new)).await
}

async fn run(
    wf: &Workflow,
    call: &mut Call,
    req: gw::ComputeOfflineResponseRequest,
) -> Result<gw::ComputeOfflineResponseResponse, Error> {
    call.decision.rule = "challenge";
    let flow = match Flow::try_from(req.flow).unwrap_or(Flow::Unspecified) {
        Flow::Unspecified | Flow::OfflineHelpdesk => Flow::OfflineHelpdesk,
        Flow::WindowsUnblockScreen => Flow::WindowsUnblockScreen,
        _ => {
            return Err(Error::invalid(
                "flow",
                "flow must be FLOW_OFFLINE_HELPDESK or FLOW_WINDOWS_UNBLOCK_SCREEN",
            ));
        }
    };
    let challenge = parse_challenge(req.challenge.as_ref(), flow)?;

    let card = policy::load(wf, call, &req.user_id, &req.credential_id).await?;
    if let Err(denial) = policy::check(&call.actor, &card, HelpdeskAction::OfflineResponse) {
        call.decision.rule = denial.rule;
        return Err(denial.error);
    }
    let admin_key = card
        .template
        .spec
        .as_ref()
        .and_then(|s| s.admin_key.clone())
        .unwrap_or_default();
    call.decision.rule = "admin_key.algorithm";
    let expected = block_len(admin_key.algorithm);
    if challenge.len() != expected {
        return Err(Error::Refused(Box::new(
            Refusal::new(
                Code::InvalidArgument,
                ErrorReason::CodeWrongLength,
                format!(
                    "cards of template {:?} show a challenge of {} hex digits, {} were given",
                    card.template_name(),
                    expected * 2,
                    challenge.len() * 2
                ),
            )
            .field("challenge.hex"),
        )));
    }

    take_limits(wf, call, &card).await?;

    policy::consume_approval(
        wf,
        call,
        &card,
        HelpdeskAction::OfflineResponse,
        &req.approval_id,
    )
    .await?;

    call.decision.rule = "custody";
    let master_key_version = if card.credential.master_key_version != 0 {
        card.credential.master_key_version
    } else {
        admin_key.master_key_version
    };
    let auth = AuthContext {
        actor_kind: call.actor.actor_kind() as i32,
        actor_id: call.actor.username().to_owned(),
        on_behalf_of_user_id: card.user.id.clone(),
        card_id: card.credential.card_id.clone(),
        flow: flow as i32,
        approval_id: call.decision.approval_id.clone(),
        request_id: call.budget.request_id.clone(),
        template_id: card.template.id.clone(),
        template_version: card.template.version,
        peer_identity: call.actor.peer.clone(),
        ticket_reference: req.ticket_reference.chars().take(128).collect(),
        session_id: String::new(),
    };
    let message = ComputeCryptogramRequest {
        card_id: card.credential.card_id.clone(),
        challenge: challenge.to_vec(),
        master_key_reference: admin_key.master_key_reference.clone(),
        master_key_version,
        scheme: admin_key.diversification_scheme,
        admin_key_algorithm: admin_key.algorithm,
        auth: Some(auth),
        challenge_code: None,
    };
    let mut custody = wf.custody.clone();
    let answer = call
        .budget
        .call(
            "custody",
            custody.compute_cryptogram(call.budget.request(message)),
        )
        .await?;
    let response = Zeroizing::new(answer.response);
    Ok(gw::ComputeOfflineResponseResponse {
        response: Some(TypedCode {
            hex: cms_cardcrypto::format_groups(&response),
            checksum: answer.response_checksum,
        }),
        request_id: call.budget.request_id.clone(),
        master_key_version: answer.master_key_version,
    })
}

/// The challenge's bytes, after its checksum (required except from the Windows unblock
/// screen, which shows none).
fn parse_challenge(code: Option<&TypedCode>, flow: Flow) -> Result<Zeroizing<Vec<u8>>, Error> {
    let code = code.ok_or_else(|| Error::invalid("challenge", "the challenge is required"))?;
    let parsed = if code.checksum.trim().is_empty() && flow == Flow::WindowsUnblockScreen {
        cms_cardcrypto::parse_hex(&code.hex, &CHALLENGE_LENGTHS)
    } else {
        cms_cardcrypto::parse_with_checksum(&code.hex, &code.checksum, &CHALLENGE_LENGTHS)
    };
    parsed.map_err(code_refusal)
}

/// A typed-code error as INVALID_ARGUMENT with its reason and field (never the code itself).
fn code_refusal(err: CodeError) -> Error {
    let (reason, field) = match &err {
        CodeError::Empty | CodeError::WrongLength { .. } | CodeError::OddDigits { .. } => {
            (ErrorReason::CodeWrongLength, "challenge.hex")
        }
        CodeError::NotHex { .. } => (ErrorReason::CodeNotHex, "challenge.hex"),
        CodeError::ChecksumMissing { .. } => {
            (ErrorReason::CodeChecksumMissing, "challenge.checksum")
        }
        CodeError::ChecksumMalformed | CodeError::ChecksumMismatch => {
            (ErrorReason::CodeChecksumMismatch, "challenge.checksum")
        }
    };
    Error::Refused(Box::new(
        Refusal::new(Code::InvalidArgument, reason, format!("challenge: {err}")).field(field),
    ))
}

fn block_len(algorithm: i32) -> usize {
    match KeyAlgorithm::try_from(algorithm).unwrap_or(KeyAlgorithm::Unspecified) {
        KeyAlgorithm::Aes128 | KeyAlgorithm::Aes192 | KeyAlgorithm::Aes256 => 16,
        _ => 8,
    }
}

/// The template's rate limits that an offline response counts against.
async fn take_limits(wf: &Workflow, call: &mut Call, card: &Card) -> Result<(), Error> {
    for limit in &card.unblock().rate_limits {
        let Some((bucket, what)) = bucket(limit, call, card) else {
            continue;
        };
        let window = limit
            .window
            .as_ref()
            .and_then(|d| u64::try_from(d.seconds).ok())
            .filter(|s| *s > 0)
            .map(Duration::from_secs);
        let Some(window) = window else { continue };
        if limit.max_count == 0 {
            continue;
        }
        call.decision.rule = "unblock_policy.rate_limits";
        crate::ratelimit::take(&wf.writes, &bucket, limit.max_count, window, what).await?;
    }
    Ok(())
}

fn bucket(limit: &RateLimit, call: &Call, card: &Card) -> Option<(String, &'static str)> {
    let scope = RateLimitScope::try_from(limit.scope).ok()?;
    Some(match scope {
        RateLimitScope::OfflineResponsesPerCard => (
            format!("offline-card:{}", card.credential.id),
            "offline responses for this card",
        ),
        RateLimitScope::UnblocksPerCard => (
            format!("unblock-card:{}", card.credential.id),
            "unblocks of this card",
        ),
        RateLimitScope::UnblocksPerUser => (
            format!("unblock-user:{}", card.user.id),
            "unblocks of this user's cards",
        ),
        RateLimitScope::UnblocksPerOperator => (
            format!("unblock-operator:{}", call.actor.username()),
            "unblocks by this operator",
        ),
        _ => return None,
    })
}
