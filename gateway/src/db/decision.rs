//! The decision log: who did what, for whom, under which template rule, with which result.
//! Never a challenge, response, PUK, PIN or one-time code.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "decisions")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub at: i64,
    /// The operator acting (username).
    pub actor: String,
    /// The verified peer (the operator's own SPIFFE ID, or a service acting for it).
    pub peer: String,
    pub rpc: String,
    pub action: String,
    pub user_id: String,
    pub credential_id: String,
    pub template_id: String,
    pub template_version: i32,
    /// The template rule (or role rule) that decided, e.g. `operator_policy.dual_control`.
    pub rule: String,
    pub approval_id: String,
    pub request_id: String,
    /// `ok` or the gRPC code of the refusal.
    pub result: String,
    /// The caller-safe reason of a refusal.
    pub reason: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
