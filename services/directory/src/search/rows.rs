//! The users a search returns, with only the columns a result shows: not the search
//! documents (the longest of a row) nor the TOTP secrets (which a search has no use for).
//!
//! On SQLite they come back as one JSON row: sqlx hands each row over from its connection's
//! worker thread separately, about 15 µs a row, several times what SQLite takes to find it,
//! and a page is twenty rows and more.

use sea_orm::{ConnectionTrait, DbBackend, FromQueryResult};
use serde::Deserialize;

use crate::Error;
use crate::entity::user;
use crate::util::Sql;

/// The columns shown, in the order of [`Shown`]'s fields (a JSON array is read in it).
const SHOWN: [&str; 24] = [
    "num",
    "id",
    "username",
    "username_key",
    "display_name",
    "display_key",
    "email",
    "phone",
    "org_unit",
    "status",
    "external_id",
    "source",
    "failed_attempts",
    "locked_until",
    "questions_enrolled",
    "questions_updated_at",
    "totp_state",
    "totp_confirmed_at",
    "totp_last_step",
    "totp_pending_until",
    "created_at",
    "updated_at",
    "revision",
    "sort_rank",
];

#[derive(Deserialize, FromQueryResult)]
struct Shown {
    num: i64,
    id: String,
    username: String,
    username_key: String,
    display_name: String,
    display_key: String,
    email: String,
    phone: String,
    org_unit: String,
    status: i32,
    external_id: String,
    source: i32,
    failed_attempts: i32,
    locked_until: Option<i64>,
    questions_enrolled: i32,
    questions_updated_at: Option<i64>,
    totp_state: i32,
    totp_confirmed_at: Option<i64>,
    totp_last_step: i64,
    totp_pending_until: Option<i64>,
    created_at: i64,
    updated_at: i64,
    revision: i64,
    sort_rank: i64,
}

impl From<Shown> for user::Model {
    fn from(s: Shown) -> Self {
        Self {
            num: s.num,
            id: s.id,
            username: s.username,
            username_key: s.username_key,
            display_name: s.display_name,
            display_key: s.display_key,
            email: s.email,
            phone: s.phone,
            org_unit: s.org_unit,
            status: s.status,
            external_id: s.external_id,
            source: s.source,
            search_doc: String::new(),
            prefix_doc: String::new(),
            failed_attempts: s.failed_attempts,
            locked_until: s.locked_until,
            questions_enrolled: s.questions_enrolled,
            questions_updated_at: s.questions_updated_at,
            totp_state: s.totp_state,
            totp_secret: None,
            totp_params: String::new(),
            totp_confirmed_at: s.totp_confirmed_at,
            totp_last_step: s.totp_last_step,
            totp_pending_secret: None,
            totp_pending_params: String::new(),
            totp_pending_until: s.totp_pending_until,
            created_at: s.created_at,
            updated_at: s.updated_at,
            revision: s.revision,
            sort_rank: s.sort_rank,
        }
    }
}

/// `u.num, u.id, …`: what a statement whose rows are users `u` selects for [`fetch`].
pub(super) fn select_list() -> String {
    SHOWN
        .iter()
        .map(|c| format!("u.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The users `sql` (a statement selecting [`select_list`]) finds; in no particular order on
/// SQLite, where they come as one JSON array.
pub(super) async fn fetch<C: ConnectionTrait>(db: &C, sql: Sql) -> Result<Vec<user::Model>, Error> {
    if db.get_database_backend() == DbBackend::Postgres {
        return db
            .query_all_raw(sql.statement())
            .await?
            .iter()
            .map(|row| Ok(Shown::from_query_result(row, "")?.into()))
            .collect();
    }
    let mut statement = sql.statement();
    statement.sql = format!(
        "SELECT json_group_array(json_array({})) AS users FROM ({})",
        SHOWN.join(", "),
        statement.sql
    );
    let Some(row) = db.query_one_raw(statement).await? else {
        return Ok(Vec::new());
    };
    let text: String = row.try_get("", "users")?;
    let shown: Vec<Shown> = serde_json::from_str(&text)
        .map_err(|e| Error::Internal(format!("reading searched users: {e}")))?;
    Ok(shown.into_iter().map(user::Model::from).collect())
}
