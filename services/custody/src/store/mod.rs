//! Custody's database: schema, migrations, and the queries the service needs.

pub mod entities;
pub mod migration;

/// A private in-memory database with custody's schema, for unit tests (one connection: each
/// `sqlite::memory:` connection would be a database of its own).
#[cfg(test)]
pub(crate) async fn test_database() -> sea_orm::DatabaseConnection {
    use sea_orm_migration::MigratorTrait;
    let mut options = sea_orm::ConnectOptions::new("sqlite::memory:");
    options.max_connections(1).sqlx_logging(false);
    let db = sea_orm::Database::connect(options).await.unwrap();
    migration::Migrator::up(&db, None).await.unwrap();
    db
}
