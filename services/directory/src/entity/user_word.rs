//! The word-start index of the helpdesk search: one row per (word start, user), where a word
//! start is the rest of a folded field from a word boundary on, at most
//! `normalize::PREFIX_CHARS` characters (see `normalize::prefix_doc`). A prefix search is a
//! B-tree range scan on `word`.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "user_words")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub word: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub user_id: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
