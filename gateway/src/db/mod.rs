//! The gateway's own database: approvals, one-time codes, per-operator rate-limit windows and
//! the decision log. SQLite in `data_dir` by default, PostgreSQL by URL (shared by replicas:
//! every piece of workflow state a second gateway must see lives here, none in memory).

pub mod approval;
pub mod decision;
pub mod group_commit;
mod migration;
pub mod one_time_code;
pub mod rate_window;

use std::time::{SystemTime, UNIX_EPOCH};

use sea_orm::DatabaseConnection;

use crate::Error;

/// Opens the database and applies pending migrations (once, under a lock on PostgreSQL).
pub async fn open(config: &crate::Config) -> Result<DatabaseConnection, Error> {
    let db = cms_kit::db::connect(&config.database, &config.data_dir, crate::NAME).await?;
    migration::run(&db).await?;
    Ok(db)
}

/// Milliseconds since the Unix epoch: the unit of every time column.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// A time column as a protobuf timestamp.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or_default(),
    }
}
