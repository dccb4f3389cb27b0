//! The JSON the console API speaks: explicit views of the proto messages, so that the HTTP
//! contract says exactly which fields leave the gateway (a new proto field does not appear in
//! the browser by accident) and enums travel as short names (`offline-response`), not numbers.

use cms_proto::common::v1::{CardProfile, Flow, TypedCode};
use cms_proto::custody::v1::{AuditEvent, AuditOutcome, AuditRecord};
use cms_proto::directory::v1::{Credential, CredentialStatus, Operator, User, UserStatus};
use cms_proto::gateway::v1 as gw;
use gw::{ApprovalState, HelpdeskAction};
use serde::Serialize;

/// `HELPDESK_ACTION_OFFLINE_RESPONSE` → `offline-response`.
pub fn short_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
        .replace('_', "-")
}

/// `offline-response` → the enum whose proto name is `HELPDESK_ACTION_OFFLINE_RESPONSE`;
/// `None` for anything else (the unspecified value included).
pub fn from_short_name<E>(value: &str, prefix: &str, parse: fn(&str) -> Option<E>) -> Option<E> {
    if value.is_empty()
        || value.len() > 64
        || !value.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
    {
        return None;
    }
    let full = format!("{prefix}{}", value.to_ascii_uppercase().replace('-', "_"));
    if full.ends_with("_UNSPECIFIED") {
        return None;
    }
    parse(&full)
}

macro_rules! enum_name {
    ($ty:ty, $prefix:literal, $value:expr) => {
        <$ty>::try_from($value)
            .map(|e| short_name(e.as_str_name(), $prefix))
            .unwrap_or_else(|_| "unknown".to_owned())
    };
}

pub fn action_name(value: i32) -> String {
    enum_name!(HelpdeskAction, "HELPDESK_ACTION_", value)
}

pub fn parse_action(value: &str) -> Option<HelpdeskAction> {
    from_short_name(value, "HELPDESK_ACTION_", HelpdeskAction::from_str_name)
}

pub fn parse_flow(value: &str) -> Option<Flow> {
    from_short_name(value, "FLOW_", Flow::from_str_name)
}

pub fn parse_credential_status(value: &str) -> Option<CredentialStatus> {
    from_short_name(value, "CREDENTIAL_STATUS_", CredentialStatus::from_str_name)
}

fn time(t: Option<&prost_types::Timestamp>) -> Option<String> {
    t.map(ToString::to_string)
}

/// A code as people read it: upper-case hex in groups of 4, and its checksum.
#[derive(Serialize)]
pub struct CodeView {
    pub groups: String,
    pub checksum: String,
}

impl CodeView {
    /// Regroups whatever spacing the service used, so the browser always gets `1603 EBDF …`.
    pub fn from_proto(code: &TypedCode) -> Self {
        let flat: Vec<char> = code
            .hex
            .chars()
            .filter(|c| c.is_ascii_hexdigit())
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let groups = flat
            .chunks(4)
            .map(|g| g.iter().collect::<String>())
            .collect::<Vec<_>>()
            .join(" ");
        Self {
            groups,
            checksum: code.checksum.to_ascii_uppercase(),
        }
    }
}

#[derive(Serialize)]
pub struct OperatorView {
    pub id: String,
    pub username: String,
    pub display_name: String,
    pub roles: Vec<String>,
    pub org_units: Vec<String>,
    pub template_ids: Vec<String>,
}

impl From<Operator> for OperatorView {
    fn from(o: Operator) -> Self {
        let scope = o.scope.unwrap_or_default();
        Self {
            id: o.id,
            username: o.username,
            display_name: o.display_name,
            roles: o.roles,
            org_units: scope.org_units,
            template_ids: scope.template_ids,
        }
    }
}

#[derive(Serialize)]
pub struct WhoAmIView {
    pub operator: Option<OperatorView>,
    pub peer_identity: String,
    pub allowed_services: Vec<String>,
}

impl From<gw::WhoAmIResponse> for WhoAmIView {
    fn from(r: gw::WhoAmIResponse) -> Self {
        Self {
            operator: r.operator.map(Into::into),
            peer_identity: r.peer_identity,
            allowed_services: r.allowed_services,
        }
    }
}

#[derive(Serialize)]
pub struct UserView {
    pub id: String,
    pub username: String,
    pub display_name: String,
    pub email: String,
    pub phone: String,
    pub org_unit: String,
    pub status: String,
}

impl From<User> for UserView {
    fn from(u: User) -> Self {
        Self {
            status: enum_name!(UserStatus, "USER_STATUS_", u.status),
            id: u.id,
            username: u.username,
            display_name: u.display_name,
            email: u.email,
            phone: u.phone,
            org_unit: u.org_unit,
        }
    }
}

#[derive(Serialize)]
pub struct CredentialView {
    pub id: String,
    pub user_id: String,
    pub serial: String,
    pub label: String,
    pub profile: String,
    pub status: String,
    pub status_reason: String,
    pub template_id: String,
    pub template_version: u32,
    pub master_key_version: u32,
    pub puk_version: u32,
    pub puk_rotation_pending: bool,
    pub unblock_count: u32,
    pub last_unblock_at: Option<String>,
    pub issued_at: Option<String>,
}

impl From<Credential> for CredentialView {
    fn from(c: Credential) -> Self {
        Self {
            profile: enum_name!(CardProfile, "CARD_PROFILE_", c.profile),
            status: enum_name!(CredentialStatus, "CREDENTIAL_STATUS_", c.status),
            last_unblock_at: time(c.last_unblock_at.as_ref()),
            issued_at: time(c.issued_at.as_ref()),
            id: c.id,
            user_id: c.user_id,
            serial: c.serial,
            label: c.label,
            status_reason: c.status_reason,
            template_id: c.template_id,
            template_version: c.template_version,
            master_key_version: c.master_key_version,
            puk_version: c.puk_version,
            puk_rotation_pending: c.puk_rotation_pending,
            unblock_count: c.unblock_count,
        }
    }
}

#[derive(Serialize)]
pub struct SearchHitView {
    pub user: Option<UserView>,
    pub matched_credentials: Vec<CredentialView>,
    pub credential_count: u32,
}

#[derive(Serialize)]
pub struct SearchView {
    pub results: Vec<SearchHitView>,
    pub next_page_token: String,
}

impl From<gw::SearchUsersResponse> for SearchView {
    fn from(r: gw::SearchUsersResponse) -> Self {
        Self {
            results: r
                .results
                .into_iter()
                .map(|hit| SearchHitView {
                    user: hit.user.map(Into::into),
                    matched_credentials: hit
                        .matched_credentials
                        .into_iter()
                        .map(Into::into)
                        .collect(),
                    credential_count: hit.credential_count,
                })
                .collect(),
            next_page_token: r.page.map(|p| p.next_page_token).unwrap_or_default(),
        }
    }
}

#[derive(Serialize)]
pub struct CardView {
    pub credential: Option<CredentialView>,
    pub template_name: String,
    pub challenge_length: u32,
    pub allowed_actions: Vec<String>,
    pub approval_required_actions: Vec<String>,
    pub challenge_response_enforced: bool,
    pub self_service_enabled: bool,
    pub restrictions: Vec<String>,
}

impl From<gw::CardView> for CardView {
    fn from(c: gw::CardView) -> Self {
        Self {
            credential: c.credential.map(Into::into),
            template_name: c.template_name,
            challenge_length: c.challenge_length,
            allowed_actions: c.allowed_actions.into_iter().map(action_name).collect(),
            approval_required_actions: c
                .approval_required_actions
                .into_iter()
                .map(action_name)
                .collect(),
            challenge_response_enforced: c.challenge_response_enforced,
            self_service_enabled: c.self_service_enabled,
            restrictions: c.restrictions,
        }
    }
}

#[derive(Serialize)]
pub struct UserCardsView {
    pub user: Option<UserView>,
    pub cards: Vec<CardView>,
}

impl From<gw::GetUserCardsResponse> for UserCardsView {
    fn from(r: gw::GetUserCardsResponse) -> Self {
        Self {
            user: r.user.map(Into::into),
            cards: r.cards.into_iter().map(Into::into).collect(),
        }
    }
}

#[derive(Serialize)]
pub struct OfflineResponseView {
    pub response: Option<CodeView>,
    pub request_id: String,
    pub master_key_version: u32,
}

impl From<gw::ComputeOfflineResponseResponse> for OfflineResponseView {
    fn from(r: gw::ComputeOfflineResponseResponse) -> Self {
        Self {
            response: r.response.as_ref().map(CodeView::from_proto),
            request_id: r.request_id,
            master_key_version: r.master_key_version,
        }
    }
}

#[derive(Serialize)]
pub struct PivPukView {
    pub puk: String,
    pub puk_code: Option<CodeView>,
    pub puk_version: u32,
    pub exposed: bool,
    pub request_id: String,
}

impl From<gw::ReadPivPukResponse> for PivPukView {
    fn from(r: gw::ReadPivPukResponse) -> Self {
        Self {
            puk_code: r.puk_code.as_ref().map(CodeView::from_proto),
            puk: r.puk,
            puk_version: r.puk_version,
            exposed: r.exposed,
            request_id: r.request_id,
        }
    }
}

#[derive(Serialize)]
pub struct OneTimeCodeView {
    pub code: String,
    pub expires_at: Option<String>,
    pub code_id: String,
}

impl From<gw::IssueOneTimeCodeResponse> for OneTimeCodeView {
    fn from(r: gw::IssueOneTimeCodeResponse) -> Self {
        Self {
            expires_at: time(r.expires_at.as_ref()),
            code: r.code,
            code_id: r.code_id,
        }
    }
}

#[derive(Serialize)]
pub struct ApprovalView {
    pub id: String,
    pub action: String,
    pub state: String,
    pub requester_id: String,
    pub requester_name: String,
    pub user_id: String,
    pub user_display_name: String,
    pub credential_id: String,
    pub card_serial: String,
    pub reason: String,
    pub ticket_reference: String,
    pub created_at: Option<String>,
    pub expires_at: Option<String>,
    pub decided_by_name: String,
    pub decided_at: Option<String>,
    pub decision_comment: String,
}

impl From<gw::Approval> for ApprovalView {
    fn from(a: gw::Approval) -> Self {
        Self {
            action: action_name(a.action),
            state: enum_name!(ApprovalState, "APPROVAL_STATE_", a.state),
            created_at: time(a.created_at.as_ref()),
            expires_at: time(a.expires_at.as_ref()),
            decided_at: time(a.decided_at.as_ref()),
            id: a.id,
            requester_id: a.requester_id,
            requester_name: a.requester_name,
            user_id: a.user_id,
            user_display_name: a.user_display_name,
            credential_id: a.credential_id,
            card_serial: a.card_serial,
            reason: a.reason,
            ticket_reference: a.ticket_reference,
            decided_by_name: a.decided_by_name,
            decision_comment: a.decision_comment,
        }
    }
}

#[derive(Serialize)]
pub struct OneApprovalView {
    pub approval: Option<ApprovalView>,
}

impl From<Option<gw::Approval>> for OneApprovalView {
    fn from(a: Option<gw::Approval>) -> Self {
        Self {
            approval: a.map(Into::into),
        }
    }
}

#[derive(Serialize)]
pub struct ApprovalListView {
    pub approvals: Vec<ApprovalView>,
    pub next_page_token: String,
}

impl From<gw::ListPendingApprovalsResponse> for ApprovalListView {
    fn from(r: gw::ListPendingApprovalsResponse) -> Self {
        Self {
            approvals: r.approvals.into_iter().map(Into::into).collect(),
            next_page_token: r.page.map(|p| p.next_page_token).unwrap_or_default(),
        }
    }
}

#[derive(Serialize)]
pub struct AuditRecordView {
    pub sequence: u64,
    pub recorded_at: Option<String>,
    pub event: String,
    pub outcome: String,
    pub actor_id: String,
    pub on_behalf_of_user_id: String,
    pub card_id: String,
    pub flow: String,
    pub approval_id: String,
    pub request_id: String,
    pub ticket_reference: String,
    pub master_key_version: u32,
    pub reason: String,
    pub caller_identity: String,
}

impl From<AuditRecord> for AuditRecordView {
    fn from(r: AuditRecord) -> Self {
        let cx = r.context.unwrap_or_default();
        Self {
            sequence: r.sequence,
            recorded_at: time(r.recorded_at.as_ref()),
            event: enum_name!(AuditEvent, "AUDIT_EVENT_", r.event),
            outcome: enum_name!(AuditOutcome, "AUDIT_OUTCOME_", r.outcome),
            actor_id: cx.actor_id,
            on_behalf_of_user_id: cx.on_behalf_of_user_id,
            card_id: data_encoding::HEXUPPER.encode(&cx.card_id),
            flow: enum_name!(Flow, "FLOW_", cx.flow),
            approval_id: cx.approval_id,
            request_id: cx.request_id,
            ticket_reference: cx.ticket_reference,
            master_key_version: r.master_key_version,
            reason: r.reason,
            caller_identity: r.caller_identity,
        }
    }
}

#[derive(Serialize)]
pub struct AuditView {
    pub records: Vec<AuditRecordView>,
    pub next_page_token: String,
}

impl From<gw::QueryAuditResponse> for AuditView {
    fn from(r: gw::QueryAuditResponse) -> Self {
        Self {
            records: r.records.into_iter().map(Into::into).collect(),
            next_page_token: r.page.map(|p| p.next_page_token).unwrap_or_default(),
        }
    }
}

#[derive(Serialize)]
pub struct CredentialResultView {
    pub credential: Option<CredentialView>,
}

/// Paging a list page asks for (`?page_size=&page_token=`).
pub struct PageQuery {
    pub page_size: u32,
    pub page_token: String,
}

impl PageQuery {
    pub fn to_proto(&self) -> Option<cms_proto::common::v1::PageRequest> {
        Some(cms_proto::common::v1::PageRequest {
            page_size: self.page_size,
            page_token: self.page_token.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_names_round_trip_and_refuse_odd_input() {
        assert_eq!(
            action_name(HelpdeskAction::OfflineResponse as i32),
            "offline-response"
        );
        assert_eq!(action_name(999), "unknown");
        assert_eq!(
            parse_action("read-piv-puk"),
            Some(HelpdeskAction::ReadPivPuk)
        );
        for bad in ["", "unspecified", "READ-PIV-PUK", "read_piv_puk", "nope"] {
            assert_eq!(parse_action(bad), None, "{bad}");
        }
        assert_eq!(
            parse_flow("windows-unblock-screen"),
            Some(Flow::WindowsUnblockScreen)
        );
        assert_eq!(
            parse_credential_status("lost"),
            Some(CredentialStatus::Lost)
        );
    }

    #[test]
    fn codes_are_regrouped_in_fours() {
        let code = TypedCode {
            hex: "9cb2dc8314afa496".into(),
            checksum: "6340".into(),
        };
        let view = CodeView::from_proto(&code);
        assert_eq!(view.groups, "9CB2 DC83 14AF A496");
        assert_eq!(view.checksum, "6340");
        let spaced = TypedCode {
            hex: "9CB2-DC83 14AF A496".into(),
            checksum: "6340".into(),
        };
        assert_eq!(CodeView::from_proto(&spaced).groups, "9CB2 DC83 14AF A496");
    }
}
