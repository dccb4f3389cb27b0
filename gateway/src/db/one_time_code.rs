//! Helpdesk one-time codes for self-service, stored as SHA-256 of the code (the code is random
//! and shown once: it has the entropy a slow hash would add for a password).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "one_time_codes")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub user_id: String,
    /// Empty: any of the user's cards.
    pub credential_id: String,
    pub code_sha256: Vec<u8>,
    pub issued_by: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub attempts_left: i32,
    pub used_at: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
