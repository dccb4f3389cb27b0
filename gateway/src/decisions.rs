//! Writes the decision log: one row per workflow decision in the gateway's database (so every
//! replica's decisions are in one place), and the same line on the tracing target
//! `cms_gateway::decision`. Never a challenge, response, PUK, PIN or one-time code: a
//! `Decision` has no field that could carry one.

use sea_orm::{ActiveModelTrait, DatabaseConnection, NotSet, Set};

use crate::Error;
use crate::db::group_commit::GroupCommit;
use crate::db::{self, decision};
use crate::forward::DECISION_LOG;

/// What was decided, filled in as the workflow learns it.
#[derive(Clone, Debug, Default)]
pub struct Decision {
    pub actor: String,
    pub peer: String,
    pub rpc: &'static str,
    pub action: &'static str,
    pub user_id: String,
    pub credential_id: String,
    pub template_id: String,
    pub template_version: u32,
    /// The rule that decided (`operator_policy.unblock_roles`, `scope.org_units`, …).
    pub rule: &'static str,
    pub approval_id: String,
    pub request_id: String,
}

impl Decision {
    /// Records the outcome and returns once the row is committed (group-committed with other
    /// calls' rows); a failure to write is logged and does not change the answer (the
    /// cryptogram's own audit is custody's, written before it answers).
    pub async fn record(&self, writes: &GroupCommit, outcome: Result<(), &Error>) {
        let (result, reason) = match outcome {
            Ok(()) => ("ok".to_owned(), String::new()),
            Err(err) => (format!("{:?}", err.code()), err.to_string()),
        };
        tracing::info!(
            target: DECISION_LOG,
            operator = %self.actor,
            peer = %self.peer,
            rpc = self.rpc,
            action = self.action,
            user_id = %self.user_id,
            credential_id = %self.credential_id,
            template_id = %self.template_id,
            rule = self.rule,
            approval_id = %self.approval_id,
            request_id = %self.request_id,
            result = %result,
            "helpdesk decision"
        );
        let row = self.row(result, reason);
        if let Err(err) = writes.decision(row).await {
            tracing::error!(error = %err, "cannot write the decision log");
        }
    }

    /// Writes the decision in the background: for AdminService, whose calls log their own
    /// tracing line (`forward`) and do not wait for this one.
    pub fn spawn_record(self, db: &DatabaseConnection, result: String, reason: String) {
        let db = db.clone();
        tokio::spawn(async move {
            if let Err(err) = self.row(result, reason).insert(&db).await {
                tracing::error!(error = %err, "cannot write the decision log");
            }
        });
    }

    fn row(&self, result: String, reason: String) -> decision::ActiveModel {
        decision::ActiveModel {
            id: NotSet,
            at: Set(db::now_ms()),
            actor: Set(self.actor.clone()),
            peer: Set(self.peer.clone()),
            rpc: Set(self.rpc.to_owned()),
            action: Set(self.action.to_owned()),
            user_id: Set(self.user_id.clone()),
            credential_id: Set(self.credential_id.clone()),
            template_id: Set(self.template_id.clone()),
            template_version: Set(i32::try_from(self.template_version).unwrap_or(i32::MAX)),
            rule: Set(self.rule.to_owned()),
            approval_id: Set(self.approval_id.clone()),
            request_id: Set(self.request_id.clone()),
            result: Set(result),
            reason: Set(reason.chars().take(500).collect()),
        }
    }
}
