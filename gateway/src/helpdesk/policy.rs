//! A card as the workflow decides on it (its user, credential and template version), and the
//! template's rules for each helpdesk action. Pure decisions, apart from `load`.

use std::collections::HashMap;
use std::time::Duration;

use cms_proto::common::v1::{CardProfile, ErrorReason};
use cms_proto::directory::v1::{
    Credential, CredentialStatus, GetCredentialRequest, GetUserRequest, User, UserStatus,
};
use cms_proto::gateway::v1::HelpdeskAction;
use cms_proto::template::v1::{GetTemplateRequest, OperatorPolicy, Template, UnblockPolicy};
use tonic::Code;

use super::{Call, Settings, Workflow};
use crate::Error;
use crate::approvals::store::{self, Use};
use crate::authz::Actor;

/// A user's card with the template version it was issued under.
#[derive(Clone, Debug)]
pub struct Card {
    pub user: User,
    pub credential: Credential,
    pub template: Template,
}

impl Card {
    pub fn template_name(&self) -> &str {
        self.template
            .spec
            .as_ref()
            .map(|s| s.name.as_str())
            .unwrap_or_default()
    }

    pub fn unblock(&self) -> UnblockPolicy {
        self.template
            .spec
            .as_ref()
            .and_then(|s| s.unblock_policy.clone())
            .unwrap_or_default()
    }

    pub fn operator_policy(&self) -> OperatorPolicy {
        self.unblock().operator_policy.unwrap_or_default()
    }

    pub fn profile(&self) -> CardProfile {
        CardProfile::try_from(self.credential.profile).unwrap_or(CardProfile::Unspecified)
    }
}

/// Refuses an empty id field.
pub fn require_id(field: &str, value: &str) -> Result<(), Error> {
    if value.trim().is_empty() {
        return Err(Error::invalid(field, format!("{field} is required")));
    }
    if value.len() > 128 {
        return Err(Error::invalid(field, format!("{field} is too long")));
    }
    Ok(())
}

/// The user, looked up and checked against the operator's org-unit scope.
pub async fn user(wf: &Workflow, call: &mut Call, user_id: &str) -> Result<User, Error> {
    require_id("user_id", user_id)?;
    call.decision.user_id = user_id.to_owned();
    let mut directory = wf.directory.clone();
    let user = call
        .budget
        .call(
            "directory",
            directory.get_user(call.budget.request(GetUserRequest {
                id: user_id.to_owned(),
            })),
        )
        .await?
        .user
        .ok_or_else(|| Error::not_found(format!("user {user_id} not found")))?;
    call.decision.rule = "scope.org_units";
    call.actor.require_user_in_scope(&user.id, &user.org_unit)?;
    Ok(user)
}

/// Template versions never change once written, so each is read from the template service
/// once and kept (up to `MAX_CACHED` of them).
#[derive(Default)]
pub struct TemplateCache(std::sync::Mutex<HashMap<(String, u32), Template>>);

const MAX_CACHED: usize = 1024;

impl TemplateCache {
    fn get(&self, id: &str, version: u32) -> Option<Template> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(id.to_owned(), version)).cloned()
    }

    fn put(&self, template: &Template) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_CACHED {
            map.clear();
        }
        map.insert((template.id.clone(), template.version), template.clone());
    }
}

/// A template version (a given one: the latest, version 0, is not cached).
pub async fn template(
    wf: &Workflow,
    call: &Call,
    id: &str,
    version: u32,
) -> Result<Template, Error> {
    if version != 0
        && let Some(found) = wf.templates.get(id, version)
    {
        return Ok(found);
    }
    let mut client = wf.template.clone();
    let found = call
        .budget
        .call(
            "template",
            client.get_template(call.budget.request(GetTemplateRequest {
                id: id.to_owned(),
                version,
            })),
        )
        .await?
        .template
        .ok_or_else(|| Error::not_found(format!("template {id} not found")))?;
    if version != 0 && found.version == version && found.id == id {
        wf.templates.put(&found);
    }
    Ok(found)
}

/// Loads the user's card and checks both against the operator's scope.
pub async fn load(
    wf: &Workflow,
    call: &mut Call,
    user_id: &str,
    credential_id: &str,
) -> Result<Card, Error> {
    require_id("user_id", user_id)?;
    require_id("credential_id", credential_id)?;
    call.decision.user_id = user_id.to_owned();
    call.decision.credential_id = credential_id.to_owned();
    // The user and the card are read at once; the scope is checked before either is used.
    let (mut users, mut cards) = (wf.directory.clone(), wf.directory.clone());
    let (user, credential) = tokio::join!(
        call.budget.call(
            "directory",
            users.get_user(call.budget.request(GetUserRequest {
                id: user_id.to_owned(),
            })),
        ),
        call.budget.call(
            "directory",
            cards.get_credential(call.budget.request(GetCredentialRequest {
                id: credential_id.to_owned(),
            })),
        ),
    );
    let user = user?
        .user
        .ok_or_else(|| Error::not_found(format!("user {user_id} not found")))?;
    call.decision.rule = "scope.org_units";
    call.actor.require_user_in_scope(&user.id, &user.org_unit)?;
    let credential = credential?
        .credential
        .ok_or_else(|| Error::not_found(format!("card {credential_id} not found")))?;
    if credential.user_id != user.id {
        call.decision.rule = "card owner";
        return Err(Error::invalid(
            "credential_id",
            format!("card {credential_id} does not belong to user {user_id}"),
        ));
    }
    call.decision.template_id = credential.template_id.clone();
    call.decision.template_version = credential.template_version;
    call.decision.rule = "scope.template_ids";
    call.actor
        .require_template_in_scope(&credential.template_id)?;
    let template = template(
        wf,
        call,
        &credential.template_id,
        credential.template_version,
    )
    .await?;
    Ok(Card {
        user,
        credential,
        template,
    })
}

/// The template roles that allow `action` (the template's list, or the helpdesk role when the
/// template names none).
pub fn roles_for(policy: &OperatorPolicy, action: HelpdeskAction) -> (Vec<String>, &'static str) {
    let (listed, rule) = match action {
        HelpdeskAction::OfflineResponse | HelpdeskAction::OnlineUnblock => {
            (&policy.unblock_roles, "operator_policy.unblock_roles")
        }
        HelpdeskAction::ReadPivPuk => (&policy.puk_read_roles, "operator_policy.puk_read_roles"),
        HelpdeskAction::IssueOneTimeCode => (
            &policy.one_time_code_roles,
            "operator_policy.one_time_code_roles",
        ),
        HelpdeskAction::UpdateStatus | HelpdeskAction::Unspecified => {
            return (
                vec!["helpdesk".to_owned(), "admin".to_owned()],
                "gateway card status roles",
            );
        }
    };
    if listed.is_empty() {
        (vec!["helpdesk".to_owned()], rule)
    } else {
        (listed.clone(), rule)
    }
}

/// The roles that may approve actions on cards of this template.
pub fn approver_roles(policy: &OperatorPolicy) -> Vec<String> {
    if policy.approver_roles.is_empty() {
        vec!["approver".to_owned()]
    } else {
        policy.approver_roles.clone()
    }
}

/// Whether `action` needs a second operator's approval first (dual control covers unblocks
/// and PUK read-outs).
pub fn needs_approval(card: &Card, action: HelpdeskAction) -> bool {
    card.operator_policy().dual_control
        && matches!(
            action,
            HelpdeskAction::OfflineResponse
                | HelpdeskAction::OnlineUnblock
                | HelpdeskAction::ReadPivPuk
        )
}

/// Dual control for `action` on `card`: when the template asks for it, the approval
/// `approval_id` (bound to this requester, user, card and action) is used up, or the call
/// is refused; otherwise nothing happens. Records the rule and approval in the decision.
pub async fn consume_approval(
    wf: &Workflow,
    call: &mut Call,
    card: &Card,
    action: HelpdeskAction,
    approval_id: &str,
) -> Result<(), Error> {
    if !needs_approval(card, action) {
        return Ok(());
    }
    let approval_id = approval_id.trim();
    call.decision.rule = "operator_policy.dual_control";
    call.decision.approval_id = approval_id.to_owned();
    if approval_id.is_empty() {
        return Err(Error::refused(
            Code::FailedPrecondition,
            ErrorReason::ApprovalRequired,
            format!(
                "template {:?} requires a second operator's approval first: request one (RequestApproval) and pass its id once it is approved",
                card.template_name()
            ),
        ));
    }
    store::consume(
        &wf.db,
        &Use {
            approval_id,
            requester: call.actor.username(),
            user_id: &card.user.id,
            credential_id: &card.credential.id,
            action,
        },
    )
    .await
}

/// How long a granted approval stays usable: the template's approval_ttl, or the default.
pub fn approval_ttl(policy: &OperatorPolicy, settings: &Settings) -> Duration {
    policy
        .approval_ttl
        .as_ref()
        .and_then(|d| {
            let secs = u64::try_from(d.seconds).ok()?;
            let nanos = u32::try_from(d.nanos).ok()?;
            Some(Duration::new(secs, nanos))
        })
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_millis(settings.approval_ttl_ms))
}

/// A refusal and the rule that made it.
pub struct Denial {
    pub rule: &'static str,
    pub error: Error,
}

fn precondition(rule: &'static str, reason: ErrorReason, message: String) -> Denial {
    Denial {
        rule,
        error: Error::refused(Code::FailedPrecondition, reason, message),
    }
}

/// Whether `actor` may take `action` on `card` now, apart from dual control.
pub fn check(actor: &Actor, card: &Card, action: HelpdeskAction) -> Result<(), Denial> {
    let name = card.template_name();
    let unblock = card.unblock();
    if action != HelpdeskAction::UpdateStatus {
        if card.user.status == UserStatus::Disabled as i32 {
            return Err(precondition(
                "user status",
                ErrorReason::PermissionDenied,
                format!("user {} is disabled", card.user.id),
            ));
        }
        if card.credential.status != CredentialStatus::Active as i32 {
            let status = CredentialStatus::try_from(card.credential.status)
                .map(|s| {
                    s.as_str_name()
                        .trim_start_matches("CREDENTIAL_STATUS_")
                        .to_lowercase()
                })
                .unwrap_or_else(|_| "unknown".into());
            return Err(precondition(
                "card status",
                ErrorReason::CardNotActive,
                format!("card {} is {status}", card.credential.id),
            ));
        }
    }
    match action {
        HelpdeskAction::OfflineResponse => {
            if card.profile() != CardProfile::Minidriver {
                return Err(precondition(
                    "card_profile",
                    ErrorReason::FlowNotAllowed,
                    format!(
                        "card {} is not a minidriver card: a PIV card is unblocked with its PUK (ReadPivPuk)",
                        card.credential.id
                    ),
                ));
            }
            if !unblock.offline_challenge_response_allowed {
                return Err(offline_forbidden(name));
            }
        }
        HelpdeskAction::ReadPivPuk => {
            if card.profile() != CardProfile::Piv {
                return Err(precondition(
                    "card_profile",
                    ErrorReason::FlowNotAllowed,
                    format!(
                        "card {} is not a PIV card: it has no PUK",
                        card.credential.id
                    ),
                ));
            }
            if !unblock.offline_challenge_response_allowed {
                return Err(offline_forbidden(name));
            }
        }
        HelpdeskAction::IssueOneTimeCode if !unblock.self_service_enabled => {
            return Err(precondition(
                "unblock_policy.self_service_enabled",
                ErrorReason::FlowNotAllowed,
                format!(
                    "template {name:?} does not allow self-service, so a one-time code is of no use"
                ),
            ));
        }
        _ => {}
    }
    let (roles, rule) = roles_for(&card.operator_policy(), action);
    if !actor.holds_any(&roles) {
        let has = if actor.account.roles.is_empty() {
            "none".to_owned()
        } else {
            actor.account.roles.join(", ")
        };
        return Err(Denial {
            rule,
            error: Error::denied(format!(
                "operator {:?} may not {} for cards of template {name:?}: that needs the {} role (it has: {has})",
                actor.username(),
                describe(action),
                roles.join(" or ")
            )),
        });
    }
    Ok(())
}

fn offline_forbidden(template: &str) -> Denial {
    precondition(
        "unblock_policy.offline_challenge_response_allowed",
        ErrorReason::FlowNotAllowed,
        format!(
            "template {template:?} does not allow offline unblock through the helpdesk (offline challenge/response is off)"
        ),
    )
}

pub fn describe(action: HelpdeskAction) -> &'static str {
    match action {
        HelpdeskAction::OfflineResponse => "compute offline responses",
        HelpdeskAction::OnlineUnblock => "unblock online",
        HelpdeskAction::ReadPivPuk => "read PIV PUKs",
        HelpdeskAction::IssueOneTimeCode => "issue one-time codes",
        HelpdeskAction::UpdateStatus => "change card status",
        HelpdeskAction::Unspecified => "act",
    }
}

/// The flow name of an action, for the decision log.
pub fn action_name(action: HelpdeskAction) -> &'static str {
    match action {
        HelpdeskAction::OfflineResponse => "offline_response",
        HelpdeskAction::OnlineUnblock => "online_unblock",
        HelpdeskAction::ReadPivPuk => "read_piv_puk",
        HelpdeskAction::IssueOneTimeCode => "issue_one_time_code",
        HelpdeskAction::UpdateStatus => "update_status",
        HelpdeskAction::Unspecified => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cms_proto::directory::v1::Operator;
    use cms_proto::template::v1::TemplateSpec;

    fn actor(roles: &[&str]) -> Actor {
        Actor {
            account: Operator {
                username: "op".into(),
                roles: roles.iter().map(|r| (*r).to_owned()).collect(),
                ..Default::default()
            },
            peer: "spiffe://t/cms/operator/op".into(),
            via_service: None,
        }
    }

    fn card(profile: CardProfile, policy: UnblockPolicy) -> Card {
        Card {
            user: User {
                id: "u".into(),
                status: UserStatus::Active as i32,
                ..Default::default()
            },
            credential: Credential {
                id: "c".into(),
                profile: profile as i32,
                status: CredentialStatus::Active as i32,
                ..Default::default()
            },
            template: Template {
                spec: Some(TemplateSpec {
                    name: "T".into(),
                    unblock_policy: Some(policy),
                    ..Default::default()
                }),
                ..Default::default()
            },
        }
    }

    fn offline(dual: bool) -> UnblockPolicy {
        UnblockPolicy {
            offline_challenge_response_allowed: true,
            operator_policy: Some(OperatorPolicy {
                dual_control: dual,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn offline_needs_the_flow_the_profile_and_a_role() {
        let helpdesk = actor(&["helpdesk"]);
        let action = HelpdeskAction::OfflineResponse;
        assert!(
            check(
                &helpdesk,
                &card(CardProfile::Minidriver, offline(false)),
                action
            )
            .is_ok()
        );

        let denial = check(
            &helpdesk,
            &card(CardProfile::Minidriver, UnblockPolicy::default()),
            action,
        )
        .err()
        .unwrap();
        assert_eq!(
            denial.rule,
            "unblock_policy.offline_challenge_response_allowed"
        );
        assert_eq!(denial.error.code(), Code::FailedPrecondition);

        let denial = check(&helpdesk, &card(CardProfile::Piv, offline(false)), action)
            .err()
            .unwrap();
        assert_eq!(denial.rule, "card_profile");

        let denial = check(
            &actor(&["auditor"]),
            &card(CardProfile::Minidriver, offline(false)),
            action,
        )
        .err()
        .unwrap();
        assert_eq!(denial.rule, "operator_policy.unblock_roles");
        assert!(
            denial
                .error
                .to_string()
                .contains("needs the helpdesk role (it has: auditor)"),
            "{}",
            denial.error
        );
    }

    #[test]
    fn a_card_not_active_or_a_disabled_user_stops_everything_but_status_changes() {
        let helpdesk = actor(&["helpdesk"]);
        let mut lost = card(CardProfile::Minidriver, offline(false));
        lost.credential.status = CredentialStatus::Lost as i32;
        let denial = check(&helpdesk, &lost, HelpdeskAction::OfflineResponse)
            .err()
            .unwrap();
        assert!(denial.error.to_string().contains("card c is lost"));
        assert!(check(&helpdesk, &lost, HelpdeskAction::UpdateStatus).is_ok());
        let mut disabled = card(CardProfile::Minidriver, offline(false));
        disabled.user.status = UserStatus::Disabled as i32;
        assert!(check(&helpdesk, &disabled, HelpdeskAction::OfflineResponse).is_err());
    }

    #[test]
    fn dual_control_covers_unblocks_and_puk_reads_and_approvals_default_to_15_minutes() {
        let dual = card(CardProfile::Minidriver, offline(true));
        assert!(needs_approval(&dual, HelpdeskAction::OfflineResponse));
        assert!(needs_approval(&dual, HelpdeskAction::ReadPivPuk));
        assert!(!needs_approval(&dual, HelpdeskAction::IssueOneTimeCode));
        assert!(!needs_approval(
            &card(CardProfile::Minidriver, offline(false)),
            HelpdeskAction::OfflineResponse
        ));
        assert_eq!(
            approval_ttl(&OperatorPolicy::default(), &Settings::default()),
            Duration::from_secs(900)
        );
        assert_eq!(approver_roles(&OperatorPolicy::default()), vec!["approver"]);
    }
}
