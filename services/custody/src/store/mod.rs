//! Custody's database: schema, migrations, and the queries the service needs.

pub mod entities;
pub mod migration;
pub mod states;

/// A database with custody's schema in a file of its own (deleted with it), for unit tests:
/// the audit writer needs a file, as in production.
#[cfg(test)]
pub(crate) struct TestDatabase {
    db: sea_orm::DatabaseConnection,
    _dir: tempfile::TempDir,
}

#[cfg(test)]
impl std::ops::Deref for TestDatabase {
    type Target = sea_orm::DatabaseConnection;

    fn deref(&self) -> &Self::Target {
        &self.db
    }
}

#[cfg(test)]
pub(crate) async fn test_database() -> TestDatabase {
    let dir = tempfile::tempdir().unwrap();
    TestDatabase {
        db: test_database_in(dir.path()).await,
        _dir: dir,
    }
}

/// A database with custody's schema in `dir`, for unit tests.
#[cfg(test)]
pub(crate) async fn test_database_in(dir: &std::path::Path) -> sea_orm::DatabaseConnection {
    use sea_orm_migration::MigratorTrait;
    let settings = cms_kit::db::DatabaseSettings {
        url: None,
        max_connections: 2,
    };
    let db = cms_kit::db::connect(&settings, dir, "custody")
        .await
        .unwrap();
    migration::Migrator::up(&db, None).await.unwrap();
    db
}
