use sea_orm::DbBackend;
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let blob = match manager.get_database_backend() {
            DbBackend::Postgres => "BYTEA",
            _ => "BLOB",
        };
        let db = manager.get_connection();
        for sql in [
            "CREATE TABLE templates (
                id TEXT NOT NULL PRIMARY KEY,
                name TEXT NOT NULL,
                name_key TEXT NOT NULL UNIQUE,
                card_profile INTEGER NOT NULL,
                latest_version BIGINT NOT NULL,
                state INTEGER NOT NULL,
                retired_at BIGINT,
                retired_reason TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL
            )"
            .to_owned(),
            format!(
                "CREATE TABLE template_versions (
                template_id TEXT NOT NULL REFERENCES templates (id),
                version BIGINT NOT NULL,
                spec {blob} NOT NULL,
                created_at BIGINT NOT NULL,
                created_by TEXT NOT NULL,
                change_comment TEXT NOT NULL,
                PRIMARY KEY (template_id, version)
            )"
            ),
        ] {
            db.execute_unprepared(&sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("DROP TABLE template_versions")
            .await?;
        db.execute_unprepared("DROP TABLE templates").await?;
        Ok(())
    }
}
