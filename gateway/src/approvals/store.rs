//! Approvals in the database: state changes are conditional updates (`… WHERE state = pending
//! AND expires_at > now`), so two replicas, or two operators at once, cannot both decide or
//! both use one approval.

use cms_proto::gateway::v1::{Approval, ApprovalState, HelpdeskAction};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use tonic::Code;

use crate::Error;
use crate::db::{self, approval};
use cms_proto::common::v1::ErrorReason;

/// The state as the caller sees it now: a pending or approved approval past its deadline is
/// expired, whatever is stored.
pub fn state_now(row: &approval::Model, now: i64) -> ApprovalState {
    let stored = ApprovalState::try_from(row.state).unwrap_or(ApprovalState::Unspecified);
    match stored {
        ApprovalState::Pending | ApprovalState::Approved if row.expires_at <= now => {
            ApprovalState::Expired
        }
        other => other,
    }
}

pub fn to_proto(row: &approval::Model, now: i64) -> Approval {
    Approval {
        id: row.id.clone(),
        action: row.action,
        self_service_session_id: String::new(),
        state: state_now(row, now) as i32,
        requester_id: row.requester_id.clone(),
        requester_name: row.requester_name.clone(),
        user_id: row.user_id.clone(),
        user_display_name: row.user_display_name.clone(),
        credential_id: row.credential_id.clone(),
        card_serial: row.card_serial.clone(),
        template_id: row.template_id.clone(),
        reason: row.reason.clone(),
        ticket_reference: row.ticket_reference.clone(),
        created_at: Some(db::timestamp(row.created_at)),
        expires_at: Some(db::timestamp(row.expires_at)),
        decided_by: row.decided_by.clone(),
        decided_by_name: row.decided_by_name.clone(),
        decided_at: row.decided_at.map(db::timestamp),
        decision_comment: row.decision_comment.clone(),
    }
}

pub async fn get(db: &DatabaseConnection, id: &str) -> Result<approval::Model, Error> {
    approval::Entity::find_by_id(id.to_owned())
        .one(db)
        .await?
        .ok_or_else(|| Error::not_found(format!("approval {id} not found")))
}

/// Pending approvals, oldest first, from `offset` on.
pub async fn pending(
    db: &DatabaseConnection,
    now: i64,
    offset: u64,
    limit: u64,
) -> Result<Vec<approval::Model>, Error> {
    Ok(approval::Entity::find()
        .filter(approval::Column::State.eq(ApprovalState::Pending as i32))
        .filter(approval::Column::ExpiresAt.gt(now))
        .order_by_asc(approval::Column::CreatedAt)
        .order_by_asc(approval::Column::Id)
        .offset(offset)
        .limit(limit)
        .all(db)
        .await?)
}

/// Counts the pending approvals (for paging estimates).
pub async fn pending_count(db: &DatabaseConnection, now: i64) -> Result<u64, Error> {
    Ok(approval::Entity::find()
        .filter(approval::Column::State.eq(ApprovalState::Pending as i32))
        .filter(approval::Column::ExpiresAt.gt(now))
        .count(db)
        .await?)
}

/// Moves `id` from `from` to a decided state; false when it was no longer `from` (or expired).
pub async fn transition(
    db: &DatabaseConnection,
    id: &str,
    from: ApprovalState,
    to: ApprovalState,
    changes: Vec<(approval::Column, sea_orm::Value)>,
) -> Result<bool, Error> {
    let now = db::now_ms();
    let mut update = approval::Entity::update_many()
        .col_expr(approval::Column::State, Expr::value(to as i32))
        .filter(approval::Column::Id.eq(id))
        .filter(approval::Column::State.eq(from as i32))
        .filter(approval::Column::ExpiresAt.gt(now));
    for (column, value) in changes {
        update = update.col_expr(column, Expr::value(value));
    }
    Ok(update.exec(db).await?.rows_affected == 1)
}

/// What an approval must be bound to, to authorise an action.
pub struct Use<'a> {
    pub approval_id: &'a str,
    pub requester: &'a str,
    pub user_id: &'a str,
    pub credential_id: &'a str,
    pub action: HelpdeskAction,
}

/// Uses an approval once: it must be approved, unexpired, requested by this operator and
/// bound to this user, card and action. Refusals say which of these failed.
pub async fn consume(db: &DatabaseConnection, wanted: &Use<'_>) -> Result<(), Error> {
    let now = db::now_ms();
    let used = approval::Entity::update_many()
        .col_expr(
            approval::Column::State,
            Expr::value(ApprovalState::Consumed as i32),
        )
        .col_expr(approval::Column::UsedAt, Expr::value(now))
        .filter(approval::Column::Id.eq(wanted.approval_id))
        .filter(approval::Column::State.eq(ApprovalState::Approved as i32))
        .filter(approval::Column::ExpiresAt.gt(now))
        .filter(approval::Column::RequesterId.eq(wanted.requester))
        .filter(approval::Column::UserId.eq(wanted.user_id))
        .filter(approval::Column::CredentialId.eq(wanted.credential_id))
        .filter(approval::Column::Action.eq(wanted.action as i32))
        .exec(db)
        .await?
        .rows_affected;
    if used == 1 {
        return Ok(());
    }
    let id = wanted.approval_id;
    let refused = |message: String| {
        Error::refused(
            Code::FailedPrecondition,
            ErrorReason::ApprovalRequired,
            message,
        )
    };
    let Some(row) = approval::Entity::find_by_id(id.to_owned()).one(db).await? else {
        return Err(refused(format!("approval {id} does not exist")));
    };
    if row.user_id != wanted.user_id
        || row.credential_id != wanted.credential_id
        || row.action != wanted.action as i32
    {
        return Err(refused(format!(
            "approval {id} is for another user, card or action"
        )));
    }
    if row.requester_id != wanted.requester {
        return Err(refused(format!(
            "approval {id} was requested by another operator"
        )));
    }
    let why = match state_now(&row, now) {
        ApprovalState::Pending => "is still waiting for a decision",
        ApprovalState::Rejected => "was rejected",
        ApprovalState::Expired => "has expired: request a new one",
        ApprovalState::Consumed => "was already used: an approval is good for one action",
        ApprovalState::Cancelled => "was cancelled",
        ApprovalState::Approved | ApprovalState::Unspecified => "cannot be used",
    };
    Err(refused(format!("approval {id} {why}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: ApprovalState, expires_at: i64) -> approval::Model {
        approval::Model {
            id: "a".into(),
            action: HelpdeskAction::OfflineResponse as i32,
            state: state as i32,
            requester_id: "h".into(),
            requester_name: String::new(),
            user_id: "u".into(),
            user_display_name: String::new(),
            user_org_unit: String::new(),
            credential_id: "c".into(),
            card_serial: String::new(),
            template_id: "t".into(),
            reason: String::new(),
            ticket_reference: String::new(),
            created_at: 0,
            expires_at,
            approval_ttl_ms: 1000,
            decided_by: String::new(),
            decided_by_name: String::new(),
            decided_at: None,
            decision_comment: String::new(),
            used_at: None,
        }
    }

    #[test]
    fn pending_and_approved_expire_when_read_decided_ones_do_not() {
        assert_eq!(
            state_now(&row(ApprovalState::Pending, 100), 99),
            ApprovalState::Pending
        );
        assert_eq!(
            state_now(&row(ApprovalState::Pending, 100), 100),
            ApprovalState::Expired
        );
        assert_eq!(
            state_now(&row(ApprovalState::Approved, 100), 101),
            ApprovalState::Expired
        );
        assert_eq!(
            state_now(&row(ApprovalState::Consumed, 100), 101),
            ApprovalState::Consumed
        );
        assert_eq!(
            state_now(&row(ApprovalState::Rejected, 100), 101),
            ApprovalState::Rejected
        );
    }
}
