//! Fixed-window counters in the gateway's database, so that every replica counts together:
//! per operator (all workflow calls) and per card (the template's offline-response limit).

use std::time::Duration;

use cms_kit::error_details::Refusal;
use cms_proto::common::v1::ErrorReason;
use tonic::Code;

use crate::Error;
use crate::db::{self, group_commit::GroupCommit};

/// Counts one event in `bucket` and refuses when the window already holds `max`. The count
/// is committed (with others, see `group_commit`) before this returns.
pub async fn take(
    writes: &GroupCommit,
    bucket: &str,
    max: u32,
    window: Duration,
    what: &str,
) -> Result<(), Error> {
    let window_ms = Ord::max(i64::try_from(window.as_millis()).unwrap_or(i64::MAX), 1);
    let now = db::now_ms();
    let start = now - now.rem_euclid(window_ms);
    let count = writes.count(bucket, start).await?;
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
