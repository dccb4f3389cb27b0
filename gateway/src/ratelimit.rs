//! Fixed-window counters in the gateway's database, so that every replica counts together:
//! per operator (all workflow calls) and per card (the template's offline-response limit).

use std::time::Duration;

use cms_kit::error_details::Refusal;
use cms_proto::common::v1::ErrorReason;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, Set};
use tonic::Code;

use crate::Error;
use crate::db::{self, rate_window};

/// Counts one event in `bucket` and refuses when the window already holds `max`.
pub async fn take(
    db: &DatabaseConnection,
    bucket: &str,
    max: u32,
    window: Duration,
    what: &str,
) -> Result<(), Error> {
    let window_ms = Ord::max(i64::try_from(window.as_millis()).unwrap_or(i64::MAX), 1);
    let now = db::now_ms();
    let start = now - now.rem_euclid(window_ms);
    // One statement counts and reads back: `INSERT … ON CONFLICT DO UPDATE … RETURNING`.
    let count = rate_window::Entity::insert(rate_window::ActiveModel {
        bucket: Set(bucket.to_owned()),
        window_start: Set(start),
        count: Set(1),
    })
    .on_conflict(
        OnConflict::columns([
            rate_window::Column::Bucket,
            rate_window::Column::WindowStart,
        ])
        .value(
            rate_window::Column::Count,
            Expr::col((rate_window::Entity, rate_window::Column::Count)).add(1),
        )
        .to_owned(),
    )
    .exec_with_returning(db)
    .await?
    .count;
    // Old windows of this bucket go as new ones start.
    if count == 1 {
        rate_window::Entity::delete_many()
            .filter(rate_window::Column::Bucket.eq(bucket))
            .filter(rate_window::Column::WindowStart.lt(start))
            .exec(db)
            .await?;
    }
    if count <= i64::from(max) {
        return Ok(());
    }
    let retry = u32::try_from((start + window_ms - now).div_euclid(1000) + 1).unwrap_or(u32::MAX);
    Err(Error::Refused(Box::new(
        Refusal::new(
            Code::ResourceExhausted,
            ErrorReason::RateLimited,
            format!(
                "{what}: at most {max} per {} s; try again in {retry} s",
                window_ms / 1000
            ),
        )
        .retry_after_seconds(retry),
    )))
}
