//! Rewrites the search documents of the users whose name, username or email has an apostrophe
//! (see `normalize::is_mark`): they now hold that field a second time without it, so that
//! "obrien", and a query typed with another apostrophe, find "O'Brien".

use sea_orm::ActiveValue::Set;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use sea_orm_migration::prelude::*;

use super::storage;
use crate::entity::user;
use crate::search::{self, Changes};
use crate::users::{UserFields, serials_of};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// The apostrophes of `normalize::is_mark`, one LIKE pattern each.
const MARKS: [char; 7] = [
    '\'', '\u{2019}', '\u{2018}', '\u{02bc}', '\u{02bb}', '`', '\u{2032}',
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let mut any = Condition::any();
        for mark in MARKS {
            debug_assert!(crate::normalize::is_mark(mark));
            any = any.add(user::Column::SearchDoc.like(format!("%{mark}%")));
        }
        let marked = user::Entity::find().filter(any).all(db).await?;
        let mut changes = Changes::default();
        for m in &marked {
            let serials = serials_of(db, &m.id).await.map_err(storage)?;
            let mut am = user::ActiveModel::default();
            UserFields::of(m).apply(&mut am, &serials);
            let (Set(doc), Set(prefix)) = (am.search_doc, am.prefix_doc) else {
                continue;
            };
            if doc == m.search_doc {
                continue;
            }
            // The folded keys, and so the sort rank, are unchanged.
            changes.replace((m.sort_rank, &m.search_doc), (m.sort_rank, &doc));
            user::Entity::update_many()
                .set(user::ActiveModel {
                    search_doc: Set(doc),
                    prefix_doc: Set(prefix),
                    ..Default::default()
                })
                .filter(user::Column::Num.eq(m.num))
                .exec(db)
                .await?;
        }
        search::apply(db, changes).await.map_err(storage)
    }

    /// The second fields stay: they only let more queries find their users.
    async fn down(&self, _manager: &SchemaManager) -> Result<(), DbErr> {
        Ok(())
    }
}
