//! One immutable row per template version: the complete spec, protobuf-encoded.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "template_versions")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub template_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub version: i64,
    /// `cms.template.v1.TemplateSpec`, protobuf-encoded.
    pub spec: Vec<u8>,
    pub created_at: i64,
    pub created_by: String,
    pub change_comment: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
