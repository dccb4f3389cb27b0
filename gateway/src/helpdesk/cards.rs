//! Finding the caller and their cards: SearchUsers (within the operator's org units) and
//! GetUserCards (each card with the actions this operator may take on it, and why not).

use std::collections::HashMap;

use cms_proto::common::v1::{CardProfile, KeyAlgorithm};
use cms_proto::directory::v1 as dir;
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::HelpdeskAction;
use cms_proto::template::v1::Template;

use super::policy::{self, Card};
use super::{Call, Workflow};
use crate::Error;
use crate::roles::Action;

const MAX_QUERY: usize = 256;

pub async fn search(
    wf: &Workflow,
    call: &mut Call,
    req: gw::SearchUsersRequest,
) -> Result<gw::SearchUsersResponse, Error> {
    call.decision.rule = "roles";
    call.actor.require(Action::ViewHelpdesk)?;
    if req.query.len() > MAX_QUERY {
        return Err(Error::invalid(
            "query",
            format!("the query is longer than {MAX_QUERY} bytes"),
        ));
    }
    let mut directory = wf.directory.clone();
    let found = call
        .budget
        .call(
            "directory",
            directory.search_users(call.budget.request(dir::SearchUsersRequest {
                query: req.query,
                page: req.page,
                statuses: req.statuses,
                // The directory limits the search to the operator's org units and below.
                org_units: call.actor.org_units().to_vec(),
            })),
        )
        .await?;
    Ok(gw::SearchUsersResponse {
        results: found.results,
        page: found.page,
    })
}

pub async fn user_cards(
    wf: &Workflow,
    call: &mut Call,
    req: gw::GetUserCardsRequest,
) -> Result<gw::GetUserCardsResponse, Error> {
    call.decision.rule = "roles";
    call.actor.require(Action::ViewHelpdesk)?;
    let user = policy::user(wf, call, &req.user_id).await?;
    let mut directory = wf.directory.clone();
    let credentials = call
        .budget
        .call(
            "directory",
            directory.list_user_credentials(call.budget.request(dir::ListUserCredentialsRequest {
                user_id: user.id.clone(),
                include_inactive: req.include_inactive,
                page: Some(cms_proto::common::v1::PageRequest {
                    page_size: 100,
                    page_token: String::new(),
                }),
            })),
        )
        .await?
        .credentials;
    let mut templates: HashMap<(String, u32), Template> = HashMap::new();
    let mut cards = Vec::with_capacity(credentials.len());
    for credential in credentials {
        let key = (credential.template_id.clone(), credential.template_version);
        if !templates.contains_key(&key) {
            let template = policy::template(wf, call, &key.0, key.1).await?;
            templates.insert(key.clone(), template);
        }
        let template = templates.get(&key).cloned().unwrap_or_default();
        let card = Card {
            user: user.clone(),
            credential,
            template,
        };
        cards.push(view(call, &card));
    }
    call.decision.rule = "ok";
    Ok(gw::GetUserCardsResponse {
        user: Some(user),
        cards,
    })
}

/// The card with what this operator may do with it now.
fn view(call: &Call, card: &Card) -> gw::CardView {
    let actor = &call.actor;
    let mut allowed = Vec::new();
    let mut needs_approval = Vec::new();
    let mut restrictions = Vec::new();
    if !actor.covers_template(&card.credential.template_id) {
        restrictions.push(format!(
            "template {} is outside your scope",
            card.credential.template_id
        ));
    } else {
        for action in [
            HelpdeskAction::OfflineResponse,
            HelpdeskAction::ReadPivPuk,
            HelpdeskAction::IssueOneTimeCode,
            HelpdeskAction::UpdateStatus,
        ] {
            match policy::check(actor, card, action) {
                Ok(()) => {
                    allowed.push(action as i32);
                    if policy::needs_approval(card, action) {
                        needs_approval.push(action as i32);
                    }
                }
                Err(denial) => {
                    let text = denial.error.to_string();
                    if !restrictions.contains(&text) && is_relevant(card, action) {
                        restrictions.push(text);
                    }
                }
            }
        }
    }
    let unblock = card.unblock();
    let algorithm = card
        .template
        .spec
        .as_ref()
        .and_then(|s| s.admin_key.as_ref())
        .map(|k| k.algorithm)
        .unwrap_or_default();
    let challenge_length = match (card.profile(), KeyAlgorithm::try_from(algorithm)) {
        (CardProfile::Piv, _) => 0,
        (_, Ok(KeyAlgorithm::Aes128 | KeyAlgorithm::Aes192 | KeyAlgorithm::Aes256)) => 16,
        _ => 8,
    };
    gw::CardView {
        credential: Some(card.credential.clone()),
        template_name: card.template_name().to_owned(),
        challenge_length,
        allowed_actions: allowed,
        approval_required_actions: needs_approval,
        challenge_response_enforced: unblock.challenge_response_enforced,
        self_service_enabled: unblock.self_service_enabled,
        restrictions,
        present_at: Vec::new(),
    }
}

/// Whether a refusal of `action` is worth showing for this card (a PIV card's missing
/// challenge/response is not news).
fn is_relevant(card: &Card, action: HelpdeskAction) -> bool {
    match action {
        HelpdeskAction::OfflineResponse => card.profile() != CardProfile::Piv,
        HelpdeskAction::ReadPivPuk => card.profile() == CardProfile::Piv,
        _ => true,
    }
}
