//! HelpdeskService: an operator finds the caller, sees their cards and what may be done with
//! each, and performs the offline actions (challenge/response, PIV PUK read-out, one-time
//! codes, card status). Every action is decided from the card's template (allowed flows, the
//! roles it names, dual control), the operator's scope, and the rate limits; every decision
//! is logged (`decisions`).

mod cards;
pub mod codes;
mod offline;
pub mod policy;
mod puk;
mod status;

use std::sync::Arc;
use std::time::Duration;

use cms_kit::authz::IdentityPattern;
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::helpdesk_service_server::HelpdeskService;
use sea_orm::DatabaseConnection;
use serde::Deserialize;
use tonic::{Request, Response, Status};

use crate::Error;
use crate::admin::{CustodyClient, DirectoryClient, TemplateClient};
use crate::authz::{self, Actor};
use crate::db::group_commit::GroupCommit;
use crate::decisions::Decision;
use crate::downstream::Budget;
use crate::operators::OperatorAccounts;
use crate::roles::Action;

/// The `[helpdesk]` section of the gateway config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// How long a pending approval waits for a decision, and how long a granted one stays
    /// usable when the template sets no approval_ttl.
    #[serde(default = "default_approval_ttl_ms")]
    pub approval_ttl_ms: u64,
    /// Workflow calls one operator may make per window (all replicas together).
    #[serde(default = "default_operator_requests")]
    pub operator_requests_per_window: u32,
    #[serde(default = "default_operator_window_ms")]
    pub operator_window_ms: u64,
    /// The longest any backend call of the workflow may take (a caller's shorter deadline wins).
    #[serde(default = "default_downstream_timeout_ms")]
    pub downstream_timeout_ms: u64,
    /// Wrong tries a one-time code survives.
    #[serde(default = "default_code_attempts")]
    pub one_time_code_attempts: u32,
    /// Services (`spiffe://…/cms/service/<name>`, `/*` allowed) that may run the workflow on
    /// behalf of the operator they name in the `x-cms-operator` header.
    #[serde(default)]
    pub service_callers: Vec<IdentityPattern>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            approval_ttl_ms: default_approval_ttl_ms(),
            operator_requests_per_window: default_operator_requests(),
            operator_window_ms: default_operator_window_ms(),
            downstream_timeout_ms: default_downstream_timeout_ms(),
            one_time_code_attempts: default_code_attempts(),
            service_callers: Vec::new(),
        }
    }
}

fn default_approval_ttl_ms() -> u64 {
    15 * 60 * 1000
}
fn default_operator_requests() -> u32 {
    60
}
fn default_operator_window_ms() -> u64 {
    60_000
}
fn default_downstream_timeout_ms() -> u64 {
    5_000
}
fn default_code_attempts() -> u32 {
    5
}

/// What the helpdesk and approval services share: the backends, the operator accounts, the
/// database and the settings. Cheap to share (`Arc`).
pub struct Workflow {
    pub directory: DirectoryClient,
    pub template: TemplateClient,
    pub custody: CustodyClient,
    pub operators: Arc<OperatorAccounts>,
    pub db: DatabaseConnection,
    /// The per-call writes (rate-limit counts, decisions), group-committed.
    pub writes: GroupCommit,
    pub settings: Settings,
    /// Template versions already read (they never change).
    pub templates: policy::TemplateCache,
}

/// One workflow call in progress: who acts, its budget towards the backends, and the decision
/// being recorded.
pub struct Call {
    pub actor: Actor,
    pub budget: Budget,
    pub decision: Decision,
}

impl Workflow {
    /// Authenticates the operator, counts the call against its rate limit and opens the
    /// decision. A refusal here is logged too.
    pub async fn begin<T>(
        &self,
        rpc: &'static str,
        action: &'static str,
        request: &Request<T>,
    ) -> Result<Call, Error> {
        let mut decision = Decision {
            rpc,
            action,
            request_id: crate::forward::request_id_of(request),
            peer: crate::caller::peer_label(request),
            rule: "operator account",
            ..Default::default()
        };
        let actor =
            match authz::actor(&self.operators, &self.settings.service_callers, request).await {
                Ok(actor) => actor,
                Err(err) => {
                    decision.record(&self.writes, Err(&err)).await;
                    return Err(err);
                }
            };
        decision.actor = actor.username().to_owned();
        let limited = crate::ratelimit::take(
            &self.writes,
            &format!("operator:{}", actor.username()),
            self.settings.operator_requests_per_window,
            Duration::from_millis(self.settings.operator_window_ms),
            "operator request limit",
        )
        .await;
        if let Err(err) = limited {
            decision.rule = "helpdesk.operator_requests_per_window";
            decision.record(&self.writes, Err(&err)).await;
            return Err(err);
        }
        let mut budget = Budget::of(
            request,
            actor.username(),
            Duration::from_millis(self.settings.downstream_timeout_ms),
        );
        budget.request_id = decision.request_id.clone();
        Ok(Call {
            actor,
            budget,
            decision,
        })
    }

    /// Records the decision of `call` and returns `outcome`.
    pub async fn finish<R>(&self, call: &Call, outcome: Result<R, Error>) -> Result<R, Status> {
        call.decision
            .record(&self.writes, outcome.as_ref().map(|_| ()))
            .await;
        outcome.map_err(Status::from)
    }
}

/// The HelpdeskService.
#[derive(Clone)]
pub struct Helpdesk {
    pub workflow: Arc<Workflow>,
}

impl Helpdesk {
    pub fn new(workflow: Arc<Workflow>) -> Self {
        Self { workflow }
    }
}

const NOT_YET: &str = "is not available yet: use the helpdesk's offline flows (challenge/response, PUK read-out, one-time codes)";

#[tonic::async_trait]
impl HelpdeskService for Helpdesk {
    async fn who_am_i(
        &self,
        request: Request<gw::WhoAmIRequest>,
    ) -> Result<Response<gw::WhoAmIResponse>, Status> {
        let wf = &self.workflow;
        let call = wf.begin("WhoAmI", "who_am_i", &request).await?;
        let actor = &call.actor;
        let mut allowed = Vec::new();
        if actor.require(Action::ViewHelpdesk).is_ok() {
            allowed.push("HelpdeskService".to_owned());
        }
        if actor.require(Action::ViewHelpdesk).is_ok()
            || actor.require(Action::DecideApprovals).is_ok()
        {
            allowed.push("ApprovalService".to_owned());
        }
        // Status needs only an active account.
        allowed.push("AdminService".to_owned());
        let out = gw::WhoAmIResponse {
            operator: Some(actor.account.clone()),
            peer_identity: actor.peer.clone(),
            allowed_services: allowed,
        };
        wf.finish(&call, Ok(Response::new(out))).await
    }

    async fn search_users(
        &self,
        request: Request<gw::SearchUsersRequest>,
    ) -> Result<Response<gw::SearchUsersResponse>, Status> {
        let wf = &self.workflow;
        let mut call = wf.begin("SearchUsers", "search_users", &request).await?;
        let outcome = cards::search(wf, &mut call, request.into_inner()).await;
        wf.finish(&call, outcome.map(Response::new)).await
    }

    async fn get_user_cards(
        &self,
        request: Request<gw::GetUserCardsRequest>,
    ) -> Result<Response<gw::GetUserCardsResponse>, Status> {
        let wf = &self.workflow;
        let mut call = wf.begin("GetUserCards", "get_user_cards", &request).await?;
        let outcome = cards::user_cards(wf, &mut call, request.into_inner()).await;
        wf.finish(&call, outcome.map(Response::new)).await
    }

    async fn compute_offline_response(
        &self,
        request: Request<gw::ComputeOfflineResponseRequest>,
    ) -> Result<Response<gw::ComputeOfflineResponseResponse>, Status> {
        offline::compute(&self.workflow, request).await
    }

    async fn issue_one_time_code(
        &self,
        request: Request<gw::IssueOneTimeCodeRequest>,
    ) -> Result<Response<gw::IssueOneTimeCodeResponse>, Status> {
        let wf = &self.workflow;
        let mut call = wf
            .begin("IssueOneTimeCode", "issue_one_time_code", &request)
            .await?;
        let outcome = codes::issue(wf, &mut call, request.into_inner()).await;
        wf.finish(&call, outcome.map(Response::new)).await
    }

    async fn list_agents(
        &self,
        _request: Request<gw::ListAgentsRequest>,
    ) -> Result<Response<gw::ListAgentsResponse>, Status> {
        Err(Status::unimplemented(format!("ListAgents {NOT_YET}")))
    }

    async fn get_agent_card(
        &self,
        _request: Request<gw::GetAgentCardRequest>,
    ) -> Result<Response<gw::GetAgentCardResponse>, Status> {
        Err(Status::unimplemented(format!("GetAgentCard {NOT_YET}")))
    }

    async fn start_online_unblock(
        &self,
        _request: Request<gw::StartOnlineUnblockRequest>,
    ) -> Result<Response<gw::StartOnlineUnblockResponse>, Status> {
        Err(Status::unimplemented(format!(
            "online unblock by operator {NOT_YET}"
        )))
    }

    async fn read_piv_puk(
        &self,
        request: Request<gw::ReadPivPukRequest>,
    ) -> Result<Response<gw::ReadPivPukResponse>, Status> {
        let wf = &self.workflow;
        let mut call = wf.begin("ReadPivPuk", "read_piv_puk", &request).await?;
        let outcome = puk::read(wf, &mut call, request.into_inner()).await;
        wf.finish(&call, outcome.map(Response::new)).await
    }

    async fn update_card_status(
        &self,
        request: Request<gw::UpdateCardStatusRequest>,
    ) -> Result<Response<gw::UpdateCardStatusResponse>, Status> {
        let wf = &self.workflow;
        let mut call = wf
            .begin("UpdateCardStatus", "update_card_status", &request)
            .await?;
        let outcome = status::update(wf, &mut call, request.into_inner()).await;
        wf.finish(&call, outcome.map(Response::new)).await
    }
}
