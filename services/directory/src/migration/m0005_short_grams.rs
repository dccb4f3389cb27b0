//! Indexes every one and two characters of the users' search documents (see
//! `search::is_short`): queries that short read exactly their matches from one list instead
//! of checking users one by one. The grams of one word-start character, which they replace,
//! go.

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use sea_orm_migration::prelude::*;

use super::storage;
use crate::normalize::FIELD_SEP;
use crate::search;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// The first characters of short grams' texts (word starts, inner only).
const SHORT_PREFIXES: [char; 2] = ['\u{1e}', '\u{1d}'];

/// Deletes the grams of two characters whose first is `first` (and their counts).
async fn delete_grams(
    manager: &SchemaManager<'_>,
    first: char,
    length: usize,
) -> Result<(), DbErr> {
    let backend = manager.get_database_backend();
    let sep = if backend == DbBackend::Postgres {
        "$1"
    } else {
        "?"
    };
    for table in ["search_postings", "search_grams"] {
        manager
            .get_connection()
            .execute_raw(Statement::from_sql_and_values(
                backend,
                format!("DELETE FROM {table} WHERE length(gram) <= {length} AND substr(gram, 1, 1) = {sep}"),
                [first.to_string().into()],
            ))
            .await?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// The grams of one word-start character are the only ones of two characters (a
    /// boundary and a character).
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        delete_grams(manager, FIELD_SEP, 2).await?;
        search::fill_short(manager.get_connection())
            .await
            .map_err(storage)
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for first in SHORT_PREFIXES {
            delete_grams(manager, first, 3).await?;
        }
        search::fill_first_chars(manager.get_connection())
            .await
            .map_err(storage)
    }
}
