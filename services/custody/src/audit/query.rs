//! QueryAudit: the records that match every filter the request sets, a page at a time, oldest
//! or newest first (by sequence number). The page token is the sequence number the next page
//! starts at, so paging holds while records are appended.

use cms_proto::custody::v1::{AuditEvent, AuditOutcome, AuditRecord, QueryAuditRequest};
use sea_orm::{
    ColumnTrait, Condition, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};

use super::{AuditError, to_proto};
use crate::store::entities::audit_record::{Column, Entity};

/// Records per page when the request says none.
pub const DEFAULT_PAGE: u32 = 100;
/// Most records per page.
pub const MAX_PAGE: u32 = 1_000;

/// A QueryAudit request, checked.
#[derive(Clone, Debug)]
pub struct AuditQuery {
    condition: Condition,
    descending: bool,
    page_size: u32,
    /// Where the page starts: the first sequence number it may hold (ascending) or the last
    /// (descending); from the page token.
    resume_at: Option<i64>,
}

/// One page of records, and the token of the next (empty after the last).
#[derive(Clone, Debug, Default)]
pub struct AuditPage {
    pub records: Vec<AuditRecord>,
    pub next_page_token: String,
}

/// A filter the request got wrong: the field and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadFilter {
    pub field: &'static str,
    pub message: String,
}

fn millis(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos.clamp(0, 999_999_999) / 1_000_000))
}

impl AuditQuery {
    pub fn from_request(req: &QueryAuditRequest) -> Result<Self, BadFilter> {
        let mut condition = Condition::all();
        if let Some(from) = &req.from_time {
            condition = condition.add(Column::At.gte(millis(from)));
        }
        if let Some(to) = &req.to_time {
            condition = condition.add(Column::At.lt(millis(to)));
        }
        if !req.card_id.is_empty() {
            condition = condition.add(Column::CardId.eq(req.card_id.clone()));
        }
        if !req.actor_id.is_empty() {
            condition = condition.add(Column::ActorId.eq(req.actor_id.clone()));
        }
        if !req.user_id.is_empty() {
            condition = condition.add(Column::UserId.eq(req.user_id.clone()));
        }
        if !req.request_id.is_empty() {
            condition = condition.add(Column::RequestId.eq(req.request_id.clone()));
        }
        if !req.events.is_empty() {
            for event in &req.events {
                if matches!(
                    AuditEvent::try_from(*event),
                    Err(_) | Ok(AuditEvent::Unspecified)
                ) {
                    return Err(BadFilter {
                        field: "events",
                        message: format!("{event} is not an audit event kind"),
                    });
                }
            }
            condition = condition.add(Column::Event.is_in(req.events.iter().copied()));
        }
        match AuditOutcome::try_from(req.outcome) {
            Ok(AuditOutcome::Unspecified) => {}
            Ok(outcome) => condition = condition.add(Column::Outcome.eq(outcome as i32)),
            Err(_) => {
                return Err(BadFilter {
                    field: "outcome",
                    message: format!("{} is not an audit outcome", req.outcome),
                });
            }
        }
        if req.from_sequence > 0 {
            let from = i64::try_from(req.from_sequence).unwrap_or(i64::MAX);
            condition = condition.add(Column::Seq.gte(from));
        }
        let page = req.page.clone().unwrap_or_default();
        let resume_at = match page.page_token.as_str() {
            "" => None,
            token => Some(
                token
                    .parse::<u64>()
                    .ok()
                    .and_then(|seq| i64::try_from(seq).ok())
                    .ok_or_else(|| BadFilter {
                        field: "page.page_token",
                        message: "not a page token from a previous answer".into(),
                    })?,
            ),
        };
        Ok(Self {
            condition,
            descending: req.descending,
            page_size: match page.page_size {
                0 => DEFAULT_PAGE,
                n => n.min(MAX_PAGE),
            },
            resume_at,
        })
    }

    /// Runs the query.
    pub async fn run(self, db: &DatabaseConnection) -> Result<AuditPage, AuditError> {
        let mut condition = self.condition;
        if let Some(at) = self.resume_at {
            condition = condition.add(if self.descending {
                Column::Seq.lte(at)
            } else {
                Column::Seq.gte(at)
            });
        }
        let query = Entity::find().filter(condition);
        let query = if self.descending {
            query.order_by_desc(Column::Seq)
        } else {
            query.order_by_asc(Column::Seq)
        };
        // One more than the page: whether there is a next page, without a second query.
        let mut rows = query
            .limit(u64::from(self.page_size) + 1)
            .all(db)
            .await
            .map_err(AuditError::Read)?;
        let next_page_token = if rows.len() > self.page_size as usize {
            rows.pop()
                .map(|next| next.seq.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(AuditPage {
            records: rows.into_iter().map(to_proto).collect(),
            next_page_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use cms_proto::common::v1::PageRequest;

    use super::*;

    #[test]
    fn bad_filters_are_named() {
        let field = |req: QueryAuditRequest| AuditQuery::from_request(&req).unwrap_err().field;
        assert_eq!(
            field(QueryAuditRequest {
                events: vec![AuditEvent::Cryptogram as i32, 999],
                ..Default::default()
            }),
            "events"
        );
        assert_eq!(
            field(QueryAuditRequest {
                outcome: 42,
                ..Default::default()
            }),
            "outcome"
        );
        assert_eq!(
            field(QueryAuditRequest {
                page: Some(PageRequest {
                    page_size: 0,
                    page_token: "next please".into(),
                }),
                ..Default::default()
            }),
            "page.page_token"
        );
    }

    #[test]
    fn page_size_has_a_default_and_a_cap() {
        let size = |n| {
            AuditQuery::from_request(&QueryAuditRequest {
                page: Some(PageRequest {
                    page_size: n,
                    page_token: String::new(),
                }),
                ..Default::default()
            })
            .unwrap()
            .page_size
        };
        assert_eq!(
            (size(0), size(7), size(50_000)),
            (DEFAULT_PAGE, 7, MAX_PAGE)
        );
    }
}
