//! Versioned migrations of the directory database, run once at start (under an advisory
//! lock on PostgreSQL, see `cms_kit::db::begin_migration`).

use sea_orm_migration::prelude::*;

mod m0001_directory;
mod m0002_search_index;
mod m0003_span_grams;
mod m0004_apostrophes;
mod m0005_short_grams;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m0001_directory::Migration),
            Box::new(m0002_search_index::Migration),
            Box::new(m0003_span_grams::Migration),
            Box::new(m0004_apostrophes::Migration),
            Box::new(m0005_short_grams::Migration),
        ]
    }
}

/// A search index error as a migration error.
fn storage(err: crate::Error) -> DbErr {
    match err {
        crate::Error::Storage(e) => e,
        other => DbErr::Custom(other.to_string()),
    }
}

/// How many migrations this build knows (one `seaql_migrations` row each once applied).
pub fn count() -> usize {
    Migrator::migrations().len()
}

/// Applies every pending migration, once.
pub async fn run(db: &sea_orm::DatabaseConnection) -> Result<(), DbErr> {
    let txn = cms_kit::db::begin_migration(db, crate::NAME).await?;
    Migrator::up(&txn, None).await?;
    txn.commit().await
}
