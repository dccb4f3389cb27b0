//! Issued cards and tokens.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "credentials")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub user_id: String,
    #[sea_orm(unique)]
    pub card_id: Vec<u8>,
    pub serial: String,
    /// `normalize::serial` of `serial`.
    pub serial_key: String,
    pub atr: Vec<u8>,
    pub profile: i32,
    pub template_id: String,
    pub template_version: i64,
    pub master_key_version: i64,
    pub puk_version: i64,
    pub puk_rotation_pending: bool,
    pub status: i32,
    pub status_reason: String,
    pub issued_at: i64,
    pub last_unblock_at: Option<i64>,
    pub last_unblock_flow: i32,
    pub unblock_count: i64,
    pub updated_at: i64,
    pub label: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
