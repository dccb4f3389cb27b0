//! The conditions of a search besides its text: status and org-unit filters, the keyset of a
//! page, and exact employee (external) ids.

use cms_proto::directory::v1::{SearchUsersRequest, UserStatus};
use sea_orm::ConnectionTrait;

use super::rows;
use crate::Error;
use crate::entity::user;
use crate::users::{MAX_EXTERNAL_ID, MAX_ORG_UNIT};
use crate::util::{self, Sql, check_text, now_micros};

/// Status and org-unit filters of a search, as SQL conditions on `u` (and the external ids a
/// later tier leaves out, found by the first already).
#[derive(Clone)]
pub(super) struct Filters {
    statuses: Vec<UserStatus>,
    org_units: Vec<String>,
    not_external: Vec<String>,
}

impl Filters {
    pub(super) fn of(req: &SearchUsersRequest) -> Result<Self, Error> {
        let mut statuses = Vec::new();
        for s in &req.statuses {
            match UserStatus::try_from(*s) {
                Ok(s @ (UserStatus::Active | UserStatus::Disabled | UserStatus::Locked)) => {
                    statuses.push(s);
                }
                _ => {
                    return Err(Error::invalid(
                        "statuses",
                        "statuses names an unknown status",
                    ));
                }
            }
        }
        for (i, ou) in req.org_units.iter().enumerate() {
            check_text(&format!("org_units[{i}]"), ou, MAX_ORG_UNIT, true)?;
        }
        Ok(Self {
            statuses,
            org_units: req.org_units.clone(),
            not_external: Vec::new(),
        })
    }

    /// These filters, and not the users with one of the external ids `ids`.
    pub(super) fn leaving_out(&self, ids: &[String]) -> Self {
        Self {
            not_external: ids.to_vec(),
            ..self.clone()
        }
    }

    pub(super) fn push(&self, sql: &mut Sql, now: i64) {
        if !self.statuses.is_empty() {
            sql.push(" AND (1 = 0");
            for s in &self.statuses {
                match s {
                    UserStatus::Active => sql
                        .push(" OR (u.status = ")
                        .bind(UserStatus::Active as i32)
                        .push(" AND (u.locked_until IS NULL OR u.locked_until <= ")
                        .bind(now)
                        .push("))"),
                    UserStatus::Disabled => sql
                        .push(" OR u.status = ")
                        .bind(UserStatus::Disabled as i32),
                    _ => sql
                        .push(" OR (u.status = ")
                        .bind(UserStatus::Active as i32)
                        .push(" AND u.locked_until > ")
                        .bind(now)
                        .push(")"),
                };
            }
            sql.push(")");
        }
        if !self.org_units.is_empty() {
            sql.push(" AND (1 = 0");
            for ou in &self.org_units {
                sql.push(" OR u.org_unit = ")
                    .bind(ou.clone())
                    .push(" OR u.org_unit LIKE ")
                    .bind(format!("{}/%", util::like_escape(ou)))
                    .push(" ESCAPE '\\'");
            }
            sql.push(")");
        }
        if !self.not_external.is_empty() {
            sql.push(" AND u.external_id NOT IN (");
            push_list(sql, &self.not_external);
            sql.push(")");
        }
    }
}

/// `values` as SQL parameters separated by commas.
fn push_list(sql: &mut Sql, values: &[String]) {
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            sql.push(", ");
        }
        sql.bind(v.clone());
    }
}

/// The keyset condition of a page that starts after `after` (display key, username key, id).
pub(super) fn push_after(sql: &mut Sql, after: Option<&[String; 3]>) {
    if let Some([display, username, id]) = after {
        sql.push(" AND (u.display_key, u.username_key, u.id) > (")
            .bind(display.clone())
            .push(", ")
            .bind(username.clone())
            .push(", ")
            .bind(id.clone())
            .push(")");
    }
}

/// The external ids a query names exactly: as typed (trimmed), in upper and in lower case
/// ("e6663737" finds "E6663737"); none for an empty query or one longer than any id.
pub(super) fn external_ids(query: &str) -> Vec<String> {
    let raw = query.trim();
    if raw.is_empty() || raw.len() > MAX_EXTERNAL_ID {
        return Vec::new();
    }
    let mut ids = vec![raw.to_owned(), raw.to_uppercase(), raw.to_lowercase()];
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The users whose external id is one of `ids` (see [`external_ids`]), in page order after
/// `after`, at most `need`: an exact lookup in the external id's index.
pub(super) async fn external_id_matches<C: ConnectionTrait>(
    db: &C,
    ids: &[String],
    filters: &Filters,
    after: Option<&[String; 3]>,
    need: usize,
) -> Result<Vec<user::Model>, Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("SELECT ")
        .push(&rows::select_list())
        .push(" FROM users u WHERE u.external_id IN (");
    push_list(&mut sql, ids);
    sql.push(")");
    filters.push(&mut sql, now_micros());
    push_after(&mut sql, after);
    sql.push(" ORDER BY u.display_key, u.username_key, u.id LIMIT ")
        .bind(i64::try_from(need).unwrap_or(i64::MAX));
    // In any order: the caller merges them with the word starts and sorts them all.
    rows::fetch(db, sql).await
}
