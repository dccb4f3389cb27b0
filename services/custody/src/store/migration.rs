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
