//! Adds the grams that span a word boundary (see `search::fill_spans`) to the search
//! index of the users already there. Without them, a substring that crosses words, such as
//! "en.strom" of an email address, had every "…n strom…" as a candidate to check.

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use sea_orm_migration::prelude::*;

use super::storage;
use crate::normalize::FIELD_SEP;
use crate::search;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        search::fill_spans(manager.get_connection())
            .await
            .map_err(storage)
    }

    /// Span grams are the only grams of four characters that do not start with a boundary
    /// (a word start of three characters is the boundary and those three).
    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let db = manager.get_connection();
        let sep = if backend == DbBackend::Postgres {
            "$1"
        } else {
            "?"
        };
        for table in ["search_postings", "search_grams"] {
            db.execute_raw(Statement::from_sql_and_values(
                backend,
                format!(
                    "DELETE FROM {table} WHERE length(gram) = 4 AND substr(gram, 1, 1) <> {sep}"
                ),
                [FIELD_SEP.to_string().into()],
            ))
            .await?;
        }
        Ok(())
    }
}
