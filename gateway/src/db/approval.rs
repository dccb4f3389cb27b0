//! Dual-control approvals: requested by one operator, decided by another, used once.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "approvals")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// `cms.gateway.v1.HelpdeskAction`.
    pub action: i32,
    /// `cms.gateway.v1.ApprovalState` as stored; expiry is applied when read.
    pub state: i32,
    /// Username of the requesting operator.
    pub requester_id: String,
    pub requester_name: String,
    pub user_id: String,
    pub user_display_name: String,
    /// The user's org unit, to list approvals within an approver's scope.
    pub user_org_unit: String,
    pub credential_id: String,
    pub card_serial: String,
    pub template_id: String,
    pub reason: String,
    pub ticket_reference: String,
    pub created_at: i64,
    /// Pending: the decision deadline; approved: the use deadline.
    pub expires_at: i64,
    /// How long an approval stays usable once granted (the template's approval_ttl).
    pub approval_ttl_ms: i64,
    /// Username of the deciding operator.
    pub decided_by: String,
    pub decided_by_name: String,
    pub decided_at: Option<i64>,
    pub decision_comment: String,
    pub used_at: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
