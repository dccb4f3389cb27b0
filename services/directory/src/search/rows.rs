//! The users a search returns, with only the columns a result shows: not the search
//! documents (the longest of a row) nor the TOTP secrets (which a search has no use for);
//! and their cards.
//!
//! On SQLite both come back as one JSON row: sqlx hands each row over from its connection's
//! worker thread separately, about 15 µs a row, several times what SQLite takes to find it,
//! and a page is twenty users and more, with their cards.

use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
};
use serde::Deserialize;

use crate::Error;
use crate::entity::{credential, user};
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

/// A card as the JSON array of [`credentials_of`] holds it on SQLite: blobs in hex, the flag
/// as the integer SQLite stores.
#[derive(Deserialize)]
struct Card {
    id: String,
    user_id: String,
    card_id: String,
    serial: String,
    serial_key: String,
    atr: String,
    profile: i32,
    template_id: String,
    template_version: i64,
    master_key_version: i64,
    puk_version: i64,
    puk_rotation_pending: i64,
    status: i32,
    status_reason: String,
    issued_at: i64,
    last_unblock_at: Option<i64>,
    last_unblock_flow: i32,
    unblock_count: i64,
    updated_at: i64,
    label: String,
}

impl TryFrom<Card> for credential::Model {
    type Error = Error;

    fn try_from(c: Card) -> Result<Self, Error> {
        let bytes = |hex: &str| {
            data_encoding::HEXUPPER
                .decode(hex.as_bytes())
                .map_err(|e| Error::Internal(format!("reading searched cards: {e}")))
        };
        Ok(Self {
            card_id: bytes(&c.card_id)?,
            atr: bytes(&c.atr)?,
            id: c.id,
            user_id: c.user_id,
            serial: c.serial,
            serial_key: c.serial_key,
            profile: c.profile,
            template_id: c.template_id,
            template_version: c.template_version,
            master_key_version: c.master_key_version,
            puk_version: c.puk_version,
            puk_rotation_pending: c.puk_rotation_pending != 0,
            status: c.status,
            status_reason: c.status_reason,
            issued_at: c.issued_at,
            last_unblock_at: c.last_unblock_at,
            last_unblock_flow: c.last_unblock_flow,
            unblock_count: c.unblock_count,
            updated_at: c.updated_at,
            label: c.label,
        })
    }
}

/// The cards of users `user_ids`, newest first.
pub(super) async fn credentials_of<C: ConnectionTrait>(
    db: &C,
    user_ids: Vec<String>,
) -> Result<Vec<credential::Model>, Error> {
    if user_ids.is_empty() {
        return Ok(Vec::new());
    }
    if db.get_database_backend() == DbBackend::Postgres {
        return Ok(credential::Entity::find()
            .filter(credential::Column::UserId.is_in(user_ids))
            .order_by_desc(credential::Column::IssuedAt)
            .all(db)
            .await?);
    }
    let mut sql = Sql::new(DbBackend::Sqlite);
    sql.push(
        "SELECT json_group_array(json_array(id, user_id, hex(card_id), serial, serial_key, \
         hex(atr), profile, template_id, template_version, master_key_version, puk_version, \
         puk_rotation_pending, status, status_reason, issued_at, last_unblock_at, \
         last_unblock_flow, unblock_count, updated_at, label)) AS cards \
         FROM credentials WHERE user_id IN (SELECT value FROM json_each(",
    )
    .bind(serde_json::Value::from(user_ids).to_string())
    .push("))");
    let Some(row) = db.query_one_raw(sql.statement()).await? else {
        return Ok(Vec::new());
    };
    let text: String = row.try_get("", "cards")?;
    let cards: Vec<Card> = serde_json::from_str(&text)
        .map_err(|e| Error::Internal(format!("reading searched cards: {e}")))?;
    let mut out = cards
        .into_iter()
        .map(credential::Model::try_from)
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_by_key(|c| std::cmp::Reverse(c.issued_at));
    Ok(out)
}
