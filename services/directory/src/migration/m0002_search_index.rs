//! The search index of `search`: a sort rank per user (page order), and posting lists of
//! the grams of the search documents, filled from the users already there. They replace the
//! word-start table and the trigram index (FTS5 on SQLite, pg_trgm on PostgreSQL), which
//! found candidates in no useful order: a search had to sort all of them, or walk the users in
//! name order past every non-match.

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use sea_orm_migration::prelude::*;

use super::storage;
use crate::search;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let pg = manager.get_database_backend() == DbBackend::Postgres;
        let db = manager.get_connection();
        let (big, blob, key, without_rowid) = if pg {
            ("BIGINT", "BYTEA", "TEXT COLLATE \"C\"", "")
        } else {
            ("INTEGER", "BLOB", "TEXT", " WITHOUT ROWID")
        };
        for statement in [
            format!("ALTER TABLE users ADD COLUMN sort_rank {big} NOT NULL DEFAULT 0"),
            format!(
                "CREATE TABLE search_postings (
                    gram {key} NOT NULL,
                    lo {big} NOT NULL,
                    n INTEGER NOT NULL,
                    data {blob} NOT NULL,
                    PRIMARY KEY (gram, lo)
                ){without_rowid}"
            ),
            format!(
                "CREATE TABLE search_grams (
                    gram {key} NOT NULL PRIMARY KEY,
                    n {big} NOT NULL
                ){without_rowid}"
            ),
        ] {
            db.execute_unprepared(&statement).await?;
        }

        // Existing users, in page order, evenly apart.
        let backend = manager.get_database_backend();
        let nums: Vec<i64> = db
            .query_all_raw(Statement::from_string(
                backend,
                "SELECT num FROM users ORDER BY display_key, username_key, id",
            ))
            .await?
            .iter()
            .map(|row| row.try_get::<i64>("", "num"))
            .collect::<Result<_, _>>()?;
        let ranks = search::even_ranks(nums.len());
        let moved: Vec<(i64, i64)> = nums.into_iter().zip(ranks).collect();
        search::set_ranks(db, &moved).await.map_err(storage)?;
        drop(moved);
        db.execute_unprepared("CREATE UNIQUE INDEX users_sort_rank ON users (sort_rank)")
            .await?;
        search::fill(db).await.map_err(storage)?;

        let old: &[&str] = if pg {
            &["DROP INDEX users_search", "DROP TABLE user_words"]
        } else {
            &[
                "DROP TRIGGER users_fts_insert",
                "DROP TRIGGER users_fts_delete",
                "DROP TRIGGER users_fts_update",
                "DROP TABLE users_fts",
                "DROP TABLE user_words",
            ]
        };
        for statement in old {
            db.execute_unprepared(statement).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let pg = manager.get_database_backend() == DbBackend::Postgres;
        let db = manager.get_connection();
        let key = if pg { "TEXT COLLATE \"C\"" } else { "TEXT" };
        db.execute_unprepared(&format!(
            "CREATE TABLE user_words (
                word {key} NOT NULL,
                user_id {key} NOT NULL,
                PRIMARY KEY (word, user_id)
            ){}",
            if pg { "" } else { " WITHOUT ROWID" }
        ))
        .await?;
        let rows = db
            .query_all_raw(Statement::from_string(
                manager.get_database_backend(),
                "SELECT id, prefix_doc FROM users",
            ))
            .await?;
        for row in rows {
            let id: String = row.try_get("", "id")?;
            let doc: String = row.try_get("", "prefix_doc")?;
            for word in crate::normalize::words(&doc) {
                db.execute_raw(Statement::from_sql_and_values(
                    manager.get_database_backend(),
                    if pg {
                        "INSERT INTO user_words (word, user_id) VALUES ($1, $2)"
                    } else {
                        "INSERT INTO user_words (word, user_id) VALUES (?, ?)"
                    },
                    [word.into(), id.clone().into()],
                ))
                .await?;
            }
        }
        let restore: &[&str] = if pg {
            &["CREATE INDEX users_search ON users USING gin (search_doc gin_trgm_ops)"]
        } else {
            &[
                "CREATE VIRTUAL TABLE users_fts USING fts5(search_doc, content='users', content_rowid='num', tokenize='trigram', detail='none')",
                "INSERT INTO users_fts (users_fts) VALUES ('rebuild')",
                "CREATE TRIGGER users_fts_insert AFTER INSERT ON users BEGIN
                    INSERT INTO users_fts (rowid, search_doc) VALUES (new.num, new.search_doc);
                END",
                "CREATE TRIGGER users_fts_delete AFTER DELETE ON users BEGIN
                    INSERT INTO users_fts (users_fts, rowid, search_doc) VALUES ('delete', old.num, old.search_doc);
                END",
                "CREATE TRIGGER users_fts_update AFTER UPDATE OF search_doc ON users BEGIN
                    INSERT INTO users_fts (users_fts, rowid, search_doc) VALUES ('delete', old.num, old.search_doc);
                    INSERT INTO users_fts (rowid, search_doc) VALUES (new.num, new.search_doc);
                END",
            ]
        };
        for statement in restore {
            db.execute_unprepared(statement).await?;
        }
        for statement in [
            "DROP TABLE search_grams",
            "DROP TABLE search_postings",
            "DROP INDEX users_sort_rank",
            "ALTER TABLE users DROP COLUMN sort_rank",
        ] {
            db.execute_unprepared(statement).await?;
        }
        Ok(())
    }
}
