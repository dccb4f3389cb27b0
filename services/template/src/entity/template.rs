//! One row per template: its identity, lifecycle and the number of its latest version.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "templates")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// Name of the latest version, as given.
    pub name: String,
    /// Lower-cased name: unique across templates.
    #[sea_orm(unique)]
    pub name_key: String,
    pub card_profile: i32,
    pub latest_version: i64,
    /// `cms.template.v1.TemplateState`.
    pub state: i32,
    /// Microseconds since the Unix epoch.
    pub retired_at: Option<i64>,
    pub retired_reason: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
