//! Versioned schema migrations of custody, applied once at start.

use sea_orm::Schema;
use sea_orm_migration::prelude::*;

use super::entities::{
    audit_record, card_use, master_key, puk_card, puk_session, seal_meta, so_token,
};

pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(Initial),
            Box::new(SoTokens),
            Box::new(PivPuks),
            Box::new(UsageInAudit),
            Box::new(NoAuditTimeIndex),
            Box::new(AuditAttributes),
            Box::new(PukSessionsByCard),
        ]
    }

    fn migration_table_name() -> sea_orm::DynIden {
        "custody_migrations".into_iden()
    }
}

struct Initial;

impl MigrationName for Initial {
    fn name(&self) -> &str {
        "m20261127_000001_initial"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for Initial {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let schema = Schema::new(manager.get_database_backend());
        manager
            .create_table(schema.create_table_from_entity(seal_meta::Entity))
            .await?;
        manager
            .create_table(schema.create_table_from_entity(master_key::Entity))
            .await?;
        manager
            .create_table(schema.create_table_from_entity(card_use::Entity))
            .await?;
        manager
            .create_table(schema.create_table_from_entity(audit_record::Entity))
            .await?;
        for index in schema.create_index_from_entity(card_use::Entity) {
            manager.create_index(index).await?;
        }
        Ok(())
    }
}

/// System Owner tokens (their unblock keys' KCVs).
struct SoTokens;

impl MigrationName for SoTokens {
    fn name(&self) -> &str {
        "m20261127_000002_so_tokens"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for SoTokens {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let schema = Schema::new(manager.get_database_backend());
        manager
            .create_table(schema.create_table_from_entity(so_token::Entity))
            .await
    }
}

/// PIV PUK state per card and the online sessions that had their PUK released.
struct PivPuks;

impl MigrationName for PivPuks {
    fn name(&self) -> &str {
        "m20261127_000003_piv_puks"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for PivPuks {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let schema = Schema::new(manager.get_database_backend());
        manager
            .create_table(schema.create_table_from_entity(puk_card::Entity))
            .await?;
        manager
            .create_table(schema.create_table_from_entity(puk_session::Entity))
            .await
    }
}

/// Card usage moves into the audit records (one INSERT per committed batch instead of two
/// statements in a transaction), with an index to read the recent ones at start.
struct UsageInAudit;

impl MigrationName for UsageInAudit {
    fn name(&self) -> &str {
        "m20261127_000004_usage_in_audit"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for UsageInAudit {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // A database created by this version got the columns from the entity already.
        for column in [
            audit_record::Column::CardFp,
            audit_record::Column::ChallengeFp,
        ] {
            if !manager
                .has_column("audit_record", column.to_string().as_str())
                .await?
            {
                manager
                    .alter_table(
                        Table::alter()
                            .table(audit_record::Entity)
                            .add_column(ColumnDef::new(column).binary().null())
                            .to_owned(),
                    )
                    .await?;
            }
        }
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("audit_record_at")
                    .table(audit_record::Entity)
                    .col(audit_record::Column::At)
                    .to_owned(),
            )
            .await
    }
}

/// The index on `audit_record.at` goes: it was written with every record (one B-tree more per
/// insert, and on SQLite about a third of the WAL pages of a commit) and read only at start,
/// to find the recent uses. Those are found by sequence number now, newest first, which the
/// primary key answers (see `audit::Usage::load`).
struct NoAuditTimeIndex;

impl MigrationName for NoAuditTimeIndex {
    fn name(&self) -> &str {
        "m20261127_000005_no_audit_time_index"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for NoAuditTimeIndex {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .if_exists()
                    .name("audit_record_at")
                    .table(audit_record::Entity)
                    .to_owned(),
            )
            .await
    }
}

/// Audit records carry their event's attributes (component 2 of 3, its KCV outcome, PUK
/// versions, a session's fingerprint).
struct AuditAttributes;

impl MigrationName for AuditAttributes {
    fn name(&self) -> &str {
        "m20261206_000006_audit_attributes"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for AuditAttributes {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // A database created by this version got the column from the entity already.
        let column = audit_record::Column::Attributes;
        if manager
            .has_column("audit_record", column.to_string().as_str())
            .await?
        {
            return Ok(());
        }
        manager
            .alter_table(
                Table::alter()
                    .table(audit_record::Entity)
                    .add_column(ColumnDef::new(column).text().not_null().default(""))
                    .to_owned(),
            )
            .await
    }
}

/// A release looks up the online sessions of its card and version (exposure by a release
/// that was not rotated): an index instead of a scan of every session ever.
struct PukSessionsByCard;

impl MigrationName for PukSessionsByCard {
    fn name(&self) -> &str {
        "m20261206_000007_puk_sessions_by_card"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for PukSessionsByCard {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("puk_session_card")
                    .table(puk_session::Entity)
                    .col(puk_session::Column::CardFp)
                    .col(puk_session::Column::PukVersion)
                    .to_owned(),
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::{ConnectionTrait, Statement};

    #[tokio::test]
    async fn an_audit_record_is_written_into_its_table_alone() {
        let db = crate::store::test_database().await;
        let indexes = db
            .query_all_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit_record'",
            ))
            .await
            .unwrap();
        // `seq` is the rowid (sea-query makes an i64 key `integer PRIMARY KEY` on SQLite): no
        // index of its own, and none on `at` since migration 5.
        let names: Vec<String> = indexes
            .iter()
            .map(|r| r.try_get("", "name").unwrap())
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }
}
