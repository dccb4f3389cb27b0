//! `cmsctl approvals`: dual control. One operator requests an approval for an action on a
//! card; a different operator with an approver role approves or rejects it; the approval is
//! then good for one use of that action on that card, until it expires.

use clap::{Subcommand, ValueEnum};
use cms_proto::common::v1::PageRequest;
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::approval_service_client::ApprovalServiceClient;

use crate::helpdesk::{action_word, call, enum_word};
use crate::messages::print_json;
use crate::{Cli, Error, connect};

#[derive(Subcommand)]
pub enum ApprovalsCmd {
    /// Pending approvals you may decide (oldest first).
    List {
        /// Also your own requests (which you cannot decide).
        #[arg(long)]
        include_own: bool,
    },
    /// One approval and its state (the requester polls it).
    Show { id: String },
    /// Ask a second operator to approve an action on a user's card.
    Request {
        #[arg(long, value_enum)]
        action: Action,
        #[arg(long)]
        user: String,
        /// The card's credential id.
        #[arg(long)]
        card: String,
        /// Why, for the approver.
        #[arg(long)]
        reason: String,
        #[arg(long, default_value = "")]
        ticket: String,
    },
    /// Approve someone else's request.
    Approve {
        id: String,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Reject a request.
    Reject {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Withdraw your own pending request.
    Cancel { id: String },
}

/// The helpdesk actions an approval can be for.
#[derive(Clone, Copy, ValueEnum)]
pub enum Action {
    OfflineResponse,
    OnlineUnblock,
    Puk,
    OneTimeCode,
    CardStatus,
}

impl Action {
    fn to_proto(self) -> gw::HelpdeskAction {
        match self {
            Action::OfflineResponse => gw::HelpdeskAction::OfflineResponse,
            Action::OnlineUnblock => gw::HelpdeskAction::OnlineUnblock,
            Action::Puk => gw::HelpdeskAction::ReadPivPuk,
            Action::OneTimeCode => gw::HelpdeskAction::IssueOneTimeCode,
            Action::CardStatus => gw::HelpdeskAction::UpdateStatus,
        }
    }
}

const APPROVAL: &str = "cms.gateway.v1.Approval";

pub async fn run(cli: &Cli, command: &ApprovalsCmd) -> Result<bool, Error> {
    let session = connect(cli)?;
    let mut client = ApprovalServiceClient::new(session.channel.clone());
    let fail = |s| session.rpc_error(s);
    let json = cli.json;
    let (approval, what) = match command {
        ApprovalsCmd::List { include_own } => {
            let mut approvals = Vec::new();
            let mut token = String::new();
            loop {
                let page = client
                    .list_pending_approvals(call(gw::ListPendingApprovalsRequest {
                        page: Some(PageRequest {
                            page_size: 200,
                            page_token: token,
                        }),
                        include_own: *include_own,
                    }))
                    .await
                    .map_err(fail)?
                    .into_inner();
                approvals.extend(page.approvals);
                token = page.page.map(|p| p.next_page_token).unwrap_or_default();
                if token.is_empty() {
                    break;
                }
            }
            if json {
                let all = gw::ListPendingApprovalsResponse {
                    approvals,
                    page: None,
                };
                print_json(&all, "cms.gateway.v1.ListPendingApprovalsResponse")?;
            } else {
                print_list(&approvals);
            }
            return Ok(true);
        }
        ApprovalsCmd::Show { id } => (
            client
                .get_approval(call(gw::GetApprovalRequest { id: id.clone() }))
                .await
                .map_err(fail)?
                .into_inner()
                .approval,
            "approval",
        ),
        ApprovalsCmd::Request {
            action,
            user,
            card,
            reason,
            ticket,
        } => (
            client
                .request_approval(call(gw::RequestApprovalRequest {
                    action: action.to_proto() as i32,
                    user_id: user.clone(),
                    credential_id: card.clone(),
                    reason: reason.clone(),
                    ticket_reference: ticket.clone(),
                }))
                .await
                .map_err(fail)?
                .into_inner()
                .approval,
            "requested",
        ),
        ApprovalsCmd::Approve { id, comment } => (
            client
                .approve(call(gw::ApproveRequest {
                    id: id.clone(),
                    comment: comment.clone(),
                }))
                .await
                .map_err(fail)?
                .into_inner()
                .approval,
            "approved",
        ),
        ApprovalsCmd::Reject { id, reason } => (
            client
                .reject(call(gw::RejectRequest {
                    id: id.clone(),
                    reason: reason.clone(),
                }))
                .await
                .map_err(fail)?
                .into_inner()
                .approval,
            "rejected",
        ),
        ApprovalsCmd::Cancel { id } => (
            client
                .cancel_approval(call(gw::CancelApprovalRequest { id: id.clone() }))
                .await
                .map_err(fail)?
                .into_inner()
                .approval,
            "cancelled",
        ),
    };
    let approval = approval.unwrap_or_default();
    if json {
        print_json(&approval, APPROVAL)?;
    } else {
        print_one(&approval, what);
    }
    Ok(true)
}

fn state_word(value: i32) -> String {
    gw::ApprovalState::try_from(value)
        .map(|s| enum_word(s.as_str_name(), "APPROVAL_STATE_"))
        .unwrap_or_default()
}

fn time(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref().map(|t| t.to_string()).unwrap_or_default()
}

fn print_one(a: &gw::Approval, what: &str) {
    println!("{what}: approval {} ({})", a.id, state_word(a.state));
    println!("  action:     {}", action_word(a.action));
    println!(
        "  user:       {} {}",
        a.user_id,
        if a.user_display_name.is_empty() {
            String::new()
        } else {
            format!("({})", a.user_display_name)
        }
    );
    println!(
        "  card:       {} serial {:?}",
        a.credential_id, a.card_serial
    );
    println!("  requester:  {} {}", a.requester_id, a.requester_name);
    println!("  reason:     {}", a.reason);
    if !a.ticket_reference.is_empty() {
        println!("  ticket:     {}", a.ticket_reference);
    }
    println!("  expires at: {}", time(&a.expires_at));
    if !a.decided_by.is_empty() {
        println!(
            "  decided by: {} {} at {}",
            a.decided_by,
            a.decided_by_name,
            time(&a.decided_at)
        );
    }
    if !a.decision_comment.is_empty() {
        println!("  comment:    {}", a.decision_comment);
    }
}

fn print_list(approvals: &[gw::Approval]) {
    if approvals.is_empty() {
        println!("no pending approvals");
        return;
    }
    println!(
        "{:<36} {:<18} {:<20} {:<16} {:<20} {:<24} REASON",
        "ID", "ACTION", "USER", "CARD SERIAL", "REQUESTER", "EXPIRES"
    );
    for a in approvals {
        let user = if a.user_display_name.is_empty() {
            &a.user_id
        } else {
            &a.user_display_name
        };
        let requester = if a.requester_name.is_empty() {
            &a.requester_id
        } else {
            &a.requester_name
        };
        println!(
            "{:<36} {:<18} {:<20} {:<16} {:<20} {:<24} {}",
            a.id,
            action_word(a.action),
            user,
            a.card_serial,
            requester,
            time(&a.expires_at),
            a.reason
        );
    }
}
