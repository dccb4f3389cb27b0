//! Users: create, read, update, disable, and the helpdesk search.

use cms_proto::common::v1::PageResponse;
use cms_proto::directory::v1::{
    EnrolmentStatus, MatchField, SearchUsersRequest, SearchUsersResponse, TotpState, User,
    UserSearchResult, UserSource, UserStatus,
};
use sea_orm::ActiveValue::Set;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
};

use crate::entity::{credential, user};
use crate::normalize::{self, FIELD_SEP};
use crate::search_index::{self, Changes, Key};
use crate::util::{self, Sql, check_text, now_micros, timestamp};
use crate::{Directory, Error, token};

pub const MAX_USERNAME: usize = 128;
pub const MAX_DISPLAY_NAME: usize = 256;
pub const MAX_EMAIL: usize = 320;
pub const MAX_ORG_UNIT: usize = 512;
pub const MAX_EXTERNAL_ID: usize = 256;
/// Longest search query, in characters.
pub const MAX_QUERY: usize = 256;

/// The editable fields of a user, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserFields {
    pub username: String,
    pub display_name: String,
    pub email: String,
    pub phone: String,
    pub org_unit: String,
    pub external_id: String,
}

impl UserFields {
    pub fn from_proto(u: &User) -> Self {
        Self {
            username: u.username.clone(),
            display_name: u.display_name.clone(),
            email: u.email.clone(),
            phone: u.phone.clone(),
            org_unit: u.org_unit.clone(),
            external_id: u.external_id.clone(),
        }
    }

    /// Checks every field; `prefix` is prepended to field names in messages ("user.").
    /// Returns the fields with the phone number in E.164 form.
    pub fn validated(mut self, prefix: &str) -> Result<Self, (String, String)> {
        let f = |name: &str| format!("{prefix}{name}");
        let check = |name: &str, value: &str, max: usize, required: bool| {
            let checked = if prefix.is_empty() {
                check_text(name, value, max, required)
            } else {
                check_text(&f(name), value, max, required)
            };
            checked.map_err(|e| match e {
                Error::Invalid { field, message } => (field, message),
                other => (f(name), other.to_string()),
            })
        };
        check("username", &self.username, MAX_USERNAME, true)?;
        if self.username.trim() != self.username {
            return Err((
                f("username"),
                format!("{} has leading or trailing spaces", f("username")),
            ));
        }
        check("display_name", &self.display_name, MAX_DISPLAY_NAME, false)?;
        check("email", &self.email, MAX_EMAIL, false)?;
        if !self.email.is_empty() {
            let ok = match self.email.split_once('@') {
                Some((local, domain)) => {
                    !local.is_empty()
                        && !domain.is_empty()
                        && !domain.contains('@')
                        && !self.email.chars().any(char::is_whitespace)
                }
                None => false,
            };
            if !ok {
                return Err((
                    f("email"),
                    format!("{} is not an email address (local@domain)", f("email")),
                ));
            }
        }
        check("phone", &self.phone, 64, false)?;
        if !self.phone.is_empty() {
            let compact: String = self
                .phone
                .chars()
                .filter(|c| !matches!(c, ' ' | '-' | '(' | ')' | '.'))
                .collect();
            let digits = compact.strip_prefix('+').unwrap_or("");
            if digits.len() < 6
                || digits.len() > 15
                || !digits.chars().all(|c| c.is_ascii_digit())
                || digits.starts_with('0')
            {
                return Err((
                    f("phone"),
                    format!(
                        "{} is not an E.164 number (+ and 6 to 15 digits, e.g. +442079460000)",
                        f("phone")
                    ),
                ));
            }
            self.phone = compact;
        }
        check("org_unit", &self.org_unit, MAX_ORG_UNIT, false)?;
        check("external_id", &self.external_id, MAX_EXTERNAL_ID, false)?;
        Ok(self)
    }

    /// Sets the stored columns derived from these fields (keys and search documents).
    pub fn apply(&self, am: &mut user::ActiveModel, serials: &[String]) {
        let username_key = normalize::fold(&self.username);
        let display_key = normalize::fold(&self.display_name);
        let doc = normalize::search_doc_of_folded(
            &display_key,
            &username_key,
            &normalize::fold(&self.email),
            serials,
        );
        am.username = Set(self.username.clone());
        am.username_key = Set(username_key);
        am.display_name = Set(self.display_name.clone());
        am.display_key = Set(display_key);
        am.email = Set(self.email.clone());
        am.phone = Set(self.phone.clone());
        am.org_unit = Set(self.org_unit.clone());
        am.external_id = Set(self.external_id.clone());
        am.prefix_doc = Set(normalize::prefix_doc(&doc));
        am.search_doc = Set(doc);
    }

    pub fn of(m: &user::Model) -> Self {
        Self {
            username: m.username.clone(),
            display_name: m.display_name.clone(),
            email: m.email.clone(),
            phone: m.phone.clone(),
            org_unit: m.org_unit.clone(),
            external_id: m.external_id.clone(),
        }
    }
}

/// A new user row (status active) for `fields` from `source`.
pub fn new_row(fields: &UserFields, source: UserSource, now: i64) -> user::ActiveModel {
    let mut am = user::ActiveModel {
        id: Set(util::new_id()),
        status: Set(UserStatus::Active as i32),
        source: Set(source as i32),
        failed_attempts: Set(0),
        locked_until: Set(None),
        questions_enrolled: Set(0),
        questions_updated_at: Set(None),
        totp_state: Set(TotpState::None as i32),
        totp_secret: Set(None),
        totp_params: Set(String::new()),
        totp_confirmed_at: Set(None),
        totp_last_step: Set(0),
        totp_pending_secret: Set(None),
        totp_pending_params: Set(String::new()),
        totp_pending_until: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
        revision: Set(1),
        ..Default::default()
    };
    fields.apply(&mut am, &[]);
    am
}

/// Rows per multi-row INSERT of users (at most 30 parameters each: far under both databases'
/// limits, 32766 and 65535; larger statements were slower to bind).
pub const INSERT_BATCH: usize = 100;

/// Inserts new users (rows of [`new_row`], with their search documents) in page order
/// positions and indexes them for the search; `progress` gets the number inserted so far after
/// each batch.
pub async fn insert_users<C: ConnectionTrait>(
    db: &C,
    mut rows: Vec<user::ActiveModel>,
    progress: &mut (dyn FnMut(usize) + Send),
) -> Result<(), Error> {
    let mut order = Vec::with_capacity(rows.len());
    for (i, am) in rows.iter().enumerate() {
        let (Set(display), Set(username), Set(id)) = (&am.display_key, &am.username_key, &am.id)
        else {
            return Err(Error::Internal("a new user row without its keys".into()));
        };
        let key = Key {
            display: display.clone(),
            username: username.clone(),
            id: id.clone(),
        };
        order.push((key, i));
    }
    order.sort_unstable();
    let (keys, slots): (Vec<Key>, Vec<usize>) = order.into_iter().unzip();
    let mut changes = Changes::default();
    let ranks = search_index::place(db, &keys, &mut changes).await?;
    drop(keys);
    for (i, rank) in slots.into_iter().zip(ranks) {
        rows[i].sort_rank = Set(rank);
    }
    changes.add_docs(
        rows.iter()
            .filter_map(|am| match (&am.sort_rank, &am.search_doc) {
                (Set(rank), Set(doc)) => Some((*rank, doc.as_str())),
                _ => None,
            }),
    );
    let mut inserted = 0;
    let mut rows = rows.into_iter();
    loop {
        let batch: Vec<user::ActiveModel> = rows.by_ref().take(INSERT_BATCH).collect();
        if batch.is_empty() {
            break;
        }
        inserted += batch.len();
        insert_rows(db, batch).await?;
        progress(inserted);
    }
    search_index::apply(db, changes).await
}

/// The columns of a [`new_row`] that differ from user to user; [`insert_new_users`] writes
/// them in this order.
const OWN_COLUMNS: [user::Column; 12] = [
    user::Column::Id,
    user::Column::Username,
    user::Column::UsernameKey,
    user::Column::DisplayName,
    user::Column::DisplayKey,
    user::Column::Email,
    user::Column::Phone,
    user::Column::OrgUnit,
    user::Column::ExternalId,
    user::Column::SearchDoc,
    user::Column::PrefixDoc,
    user::Column::SortRank,
];

/// Inserts new users with `fields` from `source`: the rows [`new_row`] makes, and indexed for
/// the search as [`insert_users`] does, but for bulk imports: written in page order (the
/// order and rank indexes are appended to, and the ids, made in that order, ascend with it),
/// each value made just before its statement binds it (no row models: building, moving and
/// freeing hundreds of thousands of them took longer than SQLite's work).
/// `progress` gets the number inserted so far after each batch.
pub async fn insert_new_users<C: ConnectionTrait>(
    db: &C,
    fields: &[&UserFields],
    source: UserSource,
    now: i64,
    progress: &mut (dyn FnMut(usize) + Send),
) -> Result<(), Error> {
    use sea_orm::{ActiveModelTrait, IdenStatic, Iterable, Value};
    let Some(first) = fields.first() else {
        return Ok(());
    };
    // The columns every new row shares, bound once per statement: those of a new row that are
    // not its own (checked against a real one, in case `new_row` ever sets more).
    let (template, other) = (
        new_row(first, source, now),
        new_row(&UserFields::default(), source, now),
    );
    let mut shared: Vec<(&str, Value)> = Vec::new();
    let own: Vec<&str> = OWN_COLUMNS.iter().map(|c| c.as_str()).collect();
    for column in user::Column::iter().filter(|c| !own.contains(&c.as_str())) {
        match template.get(column) {
            Set(value) | sea_orm::ActiveValue::Unchanged(value) => {
                if other.get(column) != Set(value.clone()) {
                    return Err(Error::Internal(format!(
                        "new user rows differ in column {}",
                        column.as_str()
                    )));
                }
                shared.push((column.as_str(), value));
            }
            sea_orm::ActiveValue::NotSet => {}
        }
    }

    let mut order: Vec<(String, String, usize)> = fields
        .iter()
        .enumerate()
        .map(|(i, f)| {
            (
                normalize::fold(&f.display_name),
                normalize::fold(&f.username),
                i,
            )
        })
        .collect();
    order.sort_unstable();
    let (keys, slots): (Vec<Key>, Vec<usize>) = order
        .into_iter()
        .zip(new_ids(fields.len())?)
        .map(|((display, username, i), id)| {
            (
                Key {
                    display,
                    username,
                    id,
                },
                i,
            )
        })
        .unzip();
    let mut changes = Changes::default();
    let ranks = search_index::place(db, &keys, &mut changes).await?;
    let docs: Vec<String> = keys
        .iter()
        .zip(&slots)
        .map(|(k, i)| {
            let email = normalize::fold(&fields[*i].email);
            normalize::search_doc_of_folded(&k.display, &k.username, &email, &[])
        })
        .collect();
    // The posting lists are gathered on another thread meanwhile (CPU work only).
    let docs = std::sync::Arc::new(docs);
    let ranks = std::sync::Arc::new(ranks);
    let gathered = {
        let (docs, ranks) = (docs.clone(), ranks.clone());
        tokio::task::spawn_blocking(move || {
            changes.add_docs(ranks.iter().copied().zip(docs.iter().map(String::as_str)));
            changes
        })
    };

    let columns: Vec<&str> = shared
        .iter()
        .map(|(name, _)| *name)
        .chain(OWN_COLUMNS.iter().map(|c| c.as_str()))
        .collect();
    let backend = db.get_database_backend();
    let statements = (0..keys.len()).step_by(INSERT_BATCH).map(|start| {
        let end = (start + INSERT_BATCH).min(keys.len());
        let rows = (start..end).map(|j| {
            let (k, f, doc) = (&keys[j], fields[slots[j]], &docs[j]);
            [
                Value::from(k.id.clone()),
                f.username.clone().into(),
                k.username.clone().into(),
                f.display_name.clone().into(),
                k.display.clone().into(),
                f.email.clone().into(),
                f.phone.clone().into(),
                f.org_unit.clone().into(),
                f.external_id.clone().into(),
                doc.clone().into(),
                normalize::prefix_doc(doc).into(),
                ranks[j].into(),
            ]
        });
        let fixed = shared.iter().map(|(_, v)| v.clone());
        table_insert(backend, &columns, fixed, rows)
    });
    // Each statement is built while SQLite runs the one before.
    let total = keys.len();
    search_index::run_overlapped(db, statements, &mut |ran| {
        progress((ran * INSERT_BATCH).min(total));
    })
    .await?;
    let changes = gathered
        .await
        .map_err(|e| Error::Internal(format!("gathering posting lists: {e}")))?;
    search_index::apply(db, changes).await?;
    drop_later((keys, slots, docs));
    Ok(())
}

/// `n` new ids, ascending: UUIDv7s of this millisecond, as [`util::new_id`] makes them, but
/// with their random bits from one read of the system's generator instead of one per id.
fn new_ids(n: usize) -> Result<Vec<String>, Error> {
    use ring::rand::SecureRandom;
    let mut random = vec![0u8; n * 10];
    ring::rand::SystemRandom::new()
        .fill(&mut random)
        .map_err(|_| Error::Internal("the system's random generator failed".into()))?;
    let millis = u64::try_from(now_micros() / 1_000).unwrap_or(0);
    let mut ids: Vec<String> = random
        .chunks_exact(10)
        .map(|bits| {
            let bits = <[u8; 10]>::try_from(bits).unwrap_or_default();
            uuid::Builder::from_unix_timestamp_millis(millis, &bits)
                .into_uuid()
                .to_string()
        })
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// Drops `value` on a blocking thread: freeing the hundreds of thousands of strings of a bulk
/// import takes a while, which the caller spends committing instead.
pub(crate) fn drop_later<T: Send + 'static>(value: T) {
    drop(tokio::task::spawn_blocking(move || drop(value)));
}

/// One multi-row INSERT of `rows` (the same columns set in each), written out directly: the
/// ORM's statement builder takes several times as long as SQLite itself for bulk loads, and
/// each bound value costs about as much as SQLite's work for a whole column. So a value the
/// rows share (status, times, the empty TOTP fields of new users) is bound once.
async fn insert_rows<C: ConnectionTrait>(
    db: &C,
    mut rows: Vec<user::ActiveModel>,
) -> Result<(), Error> {
    use sea_orm::{ActiveModelTrait, IdenStatic, Iterable, Value};
    let Some(first) = rows.first() else {
        return Ok(());
    };
    let columns: Vec<user::Column> = user::Column::iter()
        .filter(|c| first.get(*c).is_set())
        .collect();
    let mut table: Vec<Vec<Value>> = Vec::with_capacity(rows.len());
    for row in &mut rows {
        let mut values = Vec::with_capacity(columns.len());
        for column in &columns {
            match row.take(*column) {
                Set(value) | sea_orm::ActiveValue::Unchanged(value) => values.push(value),
                sea_orm::ActiveValue::NotSet => {
                    return Err(Error::Internal(format!(
                        "new user rows differ in their columns ({})",
                        column.as_str()
                    )));
                }
            }
        }
        table.push(values);
    }
    let shared: Vec<bool> = (0..columns.len())
        .map(|j| table.len() > 1 && table.iter().all(|row| row[j] == table[0][j]))
        .collect();
    let names = |keep: bool| -> Vec<&str> {
        columns
            .iter()
            .zip(&shared)
            .filter(|(_, s)| **s == keep)
            .map(|(c, _)| c.as_str())
            .collect()
    };
    let names = [names(true), names(false)].concat();
    let fixed: Vec<Value> = table[0]
        .iter()
        .zip(&shared)
        .filter(|(_, s)| **s)
        .map(|(value, _)| value.clone())
        .collect();
    let varying = table.into_iter().map(|row| {
        row.into_iter()
            .zip(&shared)
            .filter(|(_, s)| !**s)
            .map(|(value, _)| value)
    });
    let statement = table_insert(db.get_database_backend(), &names, fixed, varying);
    db.execute_raw(statement).await?;
    Ok(())
}

/// One multi-row INSERT into users of the `columns`: first those bound once (`fixed`, in the
/// select list), then those of each row (from a VALUES table; placeholders count in text
/// order on SQLite).
fn table_insert<R>(
    backend: DbBackend,
    columns: &[&str],
    fixed: impl IntoIterator<Item = sea_orm::Value>,
    rows: impl IntoIterator<Item = R>,
) -> sea_orm::Statement
where
    R: IntoIterator<Item = sea_orm::Value>,
{
    let mut sql = Sql::new(backend);
    // On SQLite, OR FAIL: a failing row leaves the rows before it in place instead of undoing
    // the statement, so SQLite keeps no statement journal (a copy of every page the statement
    // changes). Callers run inside a transaction that any error rolls back as a whole.
    let verb = if backend == DbBackend::Sqlite {
        "INSERT OR FAIL"
    } else {
        "INSERT"
    };
    sql.push(&format!(
        "{verb} INTO users ({}) SELECT ",
        columns.join(", ")
    ));
    for value in fixed {
        sql.bind(value).push(", ");
    }
    sql.push("v.* FROM (VALUES ");
    for (i, row) in rows.into_iter().enumerate() {
        sql.tuple(i == 0, row);
    }
    sql.push(") AS v");
    sql.statement()
}

/// Re-indexes `current`, whose fields become those of `am` (keys and search document set):
/// returns its sort rank (a new one when its place in page order changes) and records the
/// posting changes. Write `am` with that rank, then apply `changes`.
pub async fn reindex<C: ConnectionTrait>(
    db: &C,
    current: &user::Model,
    am: &user::ActiveModel,
    changes: &mut Changes,
) -> Result<i64, Error> {
    let (Set(display), Set(username), Set(doc)) =
        (&am.display_key, &am.username_key, &am.search_doc)
    else {
        return Err(Error::Internal("a user change without its keys".into()));
    };
    let mut rank = current.sort_rank;
    if *display != current.display_key || *username != current.username_key {
        search_index::unrank(db, current.num).await?;
        let key = Key {
            display: display.clone(),
            username: username.clone(),
            id: current.id.clone(),
        };
        rank = search_index::place(db, &[key], changes).await?[0];
    }
    changes.replace((current.sort_rank, &current.search_doc), (rank, doc));
    Ok(rank)
}

pub fn is_locked(m: &user::Model, now: i64) -> bool {
    m.locked_until.is_some_and(|t| t > now)
}

pub fn to_proto(m: &user::Model) -> User {
    let now = now_micros();
    let status = if m.status == UserStatus::Active as i32 && is_locked(m, now) {
        UserStatus::Locked as i32
    } else {
        m.status
    };
    let totp_state = if m.totp_state == TotpState::Active as i32 {
        TotpState::Active
    } else if m.totp_pending_until.is_some_and(|t| t > now) {
        TotpState::Pending
    } else {
        TotpState::None
    };
    User {
        id: m.id.clone(),
        username: m.username.clone(),
        display_name: m.display_name.clone(),
        email: m.email.clone(),
        phone: m.phone.clone(),
        org_unit: m.org_unit.clone(),
        status,
        external_id: m.external_id.clone(),
        source: m.source,
        enrolment: Some(EnrolmentStatus {
            security_questions_enrolled: u32::try_from(m.questions_enrolled).unwrap_or(0),
            security_questions_updated_at: m.questions_updated_at.map(timestamp),
            totp_state: totp_state as i32,
            totp_confirmed_at: m.totp_confirmed_at.map(timestamp),
        }),
        locked_until: m.locked_until.filter(|t| *t > now).map(timestamp),
        created_at: Some(timestamp(m.created_at)),
        updated_at: Some(timestamp(m.updated_at)),
        etag: m.revision.to_string(),
    }
}

/// The serials of a user's credentials, for the search document.
pub async fn serials_of<C: ConnectionTrait>(db: &C, user_id: &str) -> Result<Vec<String>, Error> {
    Ok(credential::Entity::find()
        .filter(credential::Column::UserId.eq(user_id))
        .order_by_asc(credential::Column::IssuedAt)
        .all(db)
        .await?
        .into_iter()
        .map(|c| c.serial)
        .collect())
}

/// Status and org-unit filters of a search, as SQL conditions on `u` (and the external ids a
/// later tier leaves out, found by the first already).
#[derive(Clone)]
struct Filters {
    statuses: Vec<UserStatus>,
    org_units: Vec<String>,
    not_external: Vec<String>,
}

impl Filters {
    fn of(req: &SearchUsersRequest) -> Result<Self, Error> {
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

    fn push(&self, sql: &mut Sql, now: i64) {
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
fn push_after(sql: &mut Sql, after: Option<&[String; 3]>) {
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
fn external_ids(query: &str) -> Vec<String> {
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
async fn external_id_matches<C: ConnectionTrait>(
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
    sql.push("SELECT u.* FROM users u WHERE u.external_id IN (");
    push_list(&mut sql, ids);
    sql.push(")");
    filters.push(&mut sql, now_micros());
    push_after(&mut sql, after);
    sql.push(" ORDER BY u.display_key, u.username_key, u.id LIMIT ")
        .bind(i64::try_from(need).unwrap_or(i64::MAX));
    db.query_all_raw(sql.statement())
        .await?
        .iter()
        .map(|row| user::Model::from_query_result(row, "").map_err(Error::from))
        .collect()
}

/// Chunks of the rarest list a search reads in its first window of ranks; a further window
/// is at most `WINDOW_GROWTH` times as large as the one before.
const WINDOW_CHUNKS: i64 = 1;
const WINDOW_GROWTH: i64 = 4;

/// Chunks of the rarest list for the next window after one of `chunks`, for `missing` more
/// matches, `found` of them in the `read` chunks so far: as many as the matches so far say
/// they need (and half as many again), between `chunks` and `WINDOW_GROWTH` times `chunks`.
fn next_chunks(chunks: i64, read: i64, missing: usize, found: usize) -> i64 {
    let missing = i64::try_from(missing).unwrap_or(i64::MAX);
    let found = i64::try_from(found).unwrap_or(i64::MAX);
    let wanted = read.saturating_mul(missing) / found.saturating_add(1);
    wanted
        .saturating_add(wanted / 2)
        .clamp(chunks, chunks.saturating_mul(WINDOW_GROWTH))
}

/// Candidates that the lists an earlier tier read in full leave few enough to check them all
/// rather than read more lists.
const KNOWN_ENOUGH: usize = 256;

/// The least candidates a check must have found mostly not matches before the search reads
/// another list.
const MOSTLY_NOT: usize = 16;

/// What a search reads of the index once for both tiers: the length of each of the query's
/// gram lists, and the first and last sort rank (nothing for an empty query, which reads no
/// lists); and the lists a tier read in full, from the first rank to the last, for the next.
#[derive(Default)]
struct IndexView {
    counts: search_index::GramMap<i64>,
    first: i64,
    last: i64,
    full: search_index::GramMap<Vec<i64>>,
}

impl IndexView {
    async fn read<C: ConnectionTrait>(db: &C, q: &str) -> Result<Self, Error> {
        if q.is_empty() {
            return Ok(Self::default());
        }
        let mut grams = search_index::query_grams(q, 0);
        grams.extend(search_index::query_grams(q, 1));
        grams.sort_unstable();
        grams.dedup();
        let (counts, first, last) = search_index::counts_and_span(db, &grams).await?;
        Ok(Self {
            counts,
            first,
            last,
            full: Default::default(),
        })
    }
}

/// The text conditions of `tier` for folded query `q` on `u`, as SQL.
fn push_text(sql: &mut Sql, q: &str, tier: u8) {
    let find = if sql.backend == DbBackend::Postgres {
        "strpos"
    } else {
        "instr"
    };
    let marker = format!("{FIELD_SEP}{q}");
    match (q.is_empty(), tier) {
        (true, _) => {}
        (false, 0) => {
            sql.push(&format!(" AND {find}(u.prefix_doc, "))
                .bind(marker)
                .push(") > 0");
        }
        (false, _) => {
            sql.push(&format!(" AND {find}(u.search_doc, "))
                .bind(q.to_owned())
                .push(&format!(") > 0 AND {find}(u.prefix_doc, "))
                .bind(marker)
                .push(") = 0");
        }
    }
}

/// The users of candidate sort ranks `ranks` (ascending) that meet `conditions`, at most
/// `missing`, in rank order.
async fn check<C: ConnectionTrait>(
    db: &C,
    ranks: &[i64],
    conditions: &(dyn Fn(&mut Sql) + Sync),
    missing: usize,
) -> Result<Vec<user::Model>, Error> {
    let backend = db.get_database_backend();
    let mut sql = Sql::new(backend);
    let ranks: Vec<String> = ranks.iter().map(i64::to_string).collect();
    if backend == DbBackend::Postgres {
        // A lateral subquery with a LIMIT is never pulled up into a join: each candidate is
        // looked up in the array's order, and the outer LIMIT stops at the first matches
        // instead of reading and sorting every candidate.
        sql.push("SELECT u.* FROM unnest(string_to_array(")
            .bind(ranks.join(","))
            .push(
                ", ',')::bigint[]) AS c(r) CROSS JOIN LATERAL \
                 (SELECT * FROM users x WHERE x.sort_rank = c.r LIMIT 1) u WHERE 1 = 1",
            );
    } else {
        sql.push("SELECT u.* FROM json_each(")
            .bind(format!("[{}]", ranks.join(",")))
            .push(") AS c CROSS JOIN users u ON u.sort_rank = c.value WHERE 1 = 1");
    }
    conditions(&mut sql);
    // No ORDER BY: both walk the candidates in the array's order (ascending rank, the outer
    // loop) and stop at the limit, where a sort would first read every candidate. Sorted
    // below all the same.
    sql.push(" LIMIT ")
        .bind(i64::try_from(missing).unwrap_or(i64::MAX));
    let mut found = db
        .query_all_raw(sql.statement())
        .await?
        .iter()
        .map(|row| user::Model::from_query_result(row, "").map_err(Error::from))
        .collect::<Result<Vec<_>, _>>()?;
    found.sort_by_key(|m| m.sort_rank);
    Ok(found)
}

/// The first sort rank after keyset `after` (`None`: from the first).
async fn start_rank<C: ConnectionTrait>(
    db: &C,
    after: Option<&[String; 3]>,
) -> Result<Option<i64>, Error> {
    let Some([display, username, id]) = after else {
        return Ok(None);
    };
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("SELECT sort_rank FROM users WHERE (display_key, username_key, id) <= (")
        .bind(display.clone())
        .push(", ")
        .bind(username.clone())
        .push(", ")
        .bind(id.clone())
        .push(") AND sort_rank > 0 ORDER BY display_key DESC, username_key DESC, id DESC LIMIT 1");
    Ok(match db.query_one_raw(sql.statement()).await? {
        Some(row) => Some(row.try_get::<i64>("", "sort_rank")? + 1),
        None => None,
    })
}

/// The matches of a two-character substring query (tier 1), from the lists of every gram
/// that starts with it, when those hold few users (`None` when they hold many: then matches
/// are many, and walking the users in page order finds a page sooner).
async fn short_substring<C: ConnectionTrait>(
    db: &C,
    q: &str,
    conditions: &(dyn Fn(&mut Sql) + Sync),
    after: Option<&[String; 3]>,
    need: usize,
) -> Result<Option<Vec<user::Model>>, Error> {
    let Some(lists) = search_index::grams_starting(db, q).await? else {
        return Ok(None);
    };
    if lists.iter().map(|(_, n)| *n).sum::<i64>() > SHORT_LISTS_MAX {
        return Ok(None);
    }
    let grams: Vec<search_index::Gram> = lists.into_iter().map(|(g, _)| g).collect();
    let from = start_rank(db, after).await?.unwrap_or(1);
    let candidates = search_index::union_from(db, &grams, from).await?;
    let mut out = Vec::with_capacity(need);
    let (mut rest, mut checked) = (candidates.as_slice(), 0);
    while !rest.is_empty() && out.len() < need {
        let batch = check_batch(need - out.len(), checked, out.len());
        let (now, later) = rest.split_at(batch.min(rest.len()));
        checked += now.len();
        out.extend(check(db, now, conditions, need - out.len()).await?);
        rest = later;
    }
    Ok(Some(out))
}

/// Most users the lists of a short substring query may hold together for the search to read
/// them all; more, and the matches are so many that walking the users in page order finds a
/// page sooner.
const SHORT_LISTS_MAX: i64 = 60_000;

/// Candidates to check next for `missing` more matches, after `passed` of `checked` passed:
/// enough for the matches at the rate seen so far (and half as many again), so that one
/// statement usually finishes the page without reading rows far past it.
fn check_batch(missing: usize, checked: usize, passed: usize) -> usize {
    let expected = missing.saturating_mul(checked + 1) / (passed + 1);
    (expected + expected / 2).clamp(32, 512)
}

/// The users of one search tier, in page order: those whose prefix document has a word start
/// `q` (tier 0) or whose search document has `q` elsewhere (tier 1), after `after`.
///
/// The candidates come from the search index in page order (see [`search_index`]), so this
/// reads about `need` users however many match. Two characters in tier 1 read the lists of
/// the grams that start with them ([`short_substring`]) unless those are long; one character
/// in tier 1, an empty query, and such long lists walk the (display name, username, id) index
/// instead.
async fn search_tier<C: ConnectionTrait>(
    db: &C,
    view: &mut IndexView,
    q: &str,
    tier: u8,
    filters: &Filters,
    after: Option<&[String; 3]>,
    need: usize,
) -> Result<Vec<user::Model>, Error> {
    let backend = db.get_database_backend();
    let pg = backend == DbBackend::Postgres;
    let now = now_micros();
    if tier == 0 && q.chars().count() > normalize::PREFIX_CHARS {
        return Ok(Vec::new()); // longer than any stored word start: only substring matches
    }
    let conditions = |sql: &mut Sql| {
        push_text(sql, q, tier);
        filters.push(sql, now);
        push_after(sql, after);
    };
    let rows = |rows: Vec<sea_orm::QueryResult>| -> Result<Vec<user::Model>, Error> {
        rows.iter()
            .map(|row| user::Model::from_query_result(row, "").map_err(Error::from))
            .collect()
    };
    let grams = if q.is_empty() {
        Vec::new()
    } else {
        search_index::query_grams(q, tier)
    };
    if grams.is_empty()
        && tier == 1
        && q.chars().count() == 2
        && let Some(found) = short_substring(db, q, &conditions, after, need).await?
    {
        return Ok(found);
    }
    if grams.is_empty() {
        let mut sql = Sql::new(backend);
        // SQLite is told to walk the name index: left alone it may scan and sort everything.
        sql.push(if pg {
            "SELECT u.* FROM users u WHERE 1 = 1"
        } else {
            "SELECT u.* FROM users u INDEXED BY users_order WHERE 1 = 1"
        });
        conditions(&mut sql);
        sql.push(" ORDER BY u.display_key, u.username_key, u.id LIMIT ")
            .bind(i64::try_from(need).unwrap_or(i64::MAX));
        return rows(db.query_all_raw(sql.statement()).await?);
    }

    // The rarest lists (with those an earlier tier read in full, which it does not read
    // again), and where the page starts.
    let known: Vec<search_index::Gram> = grams
        .iter()
        .filter(|g| view.full.contains_key(*g))
        .copied()
        .collect();
    let few = |lists: Vec<&[i64]>| search_index::intersect(lists).len() <= KNOWN_ENOUGH;
    let search_index::Lists {
        read: mut lists,
        spare,
    } = if !known.is_empty() && few(known.iter().map(|g| view.full[g].as_slice()).collect()) {
        search_index::Lists {
            read: known,
            spare: Vec::new(),
        }
    } else {
        search_index::lists_to_read(q, tier, &view.counts, &known)
    };
    if lists.is_empty() {
        return Ok(Vec::new());
    }
    let mut spare = spare.into_iter();
    let mut to_read: Vec<search_index::Gram> = lists
        .iter()
        .filter(|g| !view.full.contains_key(*g))
        .copied()
        .collect();
    let mut rarest = to_read
        .iter()
        .min_by_key(|g| view.counts.get(*g).copied().unwrap_or(0))
        .copied();
    let mut from = start_rank(db, after).await?.unwrap_or(view.first);
    let end = view.last + 1;
    let mut chunks = WINDOW_CHUNKS;
    let mut read = 0;
    let mut whole = from == view.first;
    let mut seen: search_index::GramMap<Vec<i64>> = Default::default();

    // Window by window, the candidates in rank order, checked against the text in batches.
    let mut out = Vec::with_capacity(need);
    let mut checked = 0usize;
    while from < end && out.len() < need {
        let (window, to) = match rarest {
            Some(rarest) => search_index::window(db, &to_read, rarest, from, chunks, end).await?,
            None => (Default::default(), end),
        };
        let slices = lists
            .iter()
            .map(|g| match (window.get(g), view.full.get(g)) {
                (Some(ranks), _) => ranks.as_slice(),
                (None, Some(ranks)) => {
                    let a = ranks.partition_point(|r| *r < from);
                    &ranks[a..a + ranks[a..].partition_point(|r| *r < to)]
                }
                (None, None) => &[],
            });
        let candidates = search_index::intersect(slices.collect());
        for (g, ranks) in window {
            seen.entry(g).or_default().extend(ranks);
        }
        let mut rest = candidates.as_slice();
        let mut restart = None;
        while !rest.is_empty() && out.len() < need {
            let batch = check_batch(need - out.len(), checked, out.len());
            let (now, later) = rest.split_at(batch.min(rest.len()));
            checked += now.len();
            let found = check(db, now, &conditions, need - out.len()).await?;
            let passed = found.len();
            out.extend(found);
            rest = later;
            // Mostly not matches: the lists let through what another one rules out (the
            // users "joseph s…strom" in a search for "eph.stro" have all of "ph.s", "eph",
            // "str" and "tro", but not ".st"). Read that one as well, from here on.
            if out.len() < need
                && now.len() >= MOSTLY_NOT
                && passed * 4 < now.len()
                && let (Some(gram), Some(last)) = (spare.next(), now.last())
            {
                lists.push(gram);
                if !view.full.contains_key(&gram) {
                    to_read.push(gram);
                    // Windows are sized by a list they read (none yet when every list was
                    // known).
                    rarest = rarest.or(Some(gram));
                }
                restart = Some(last + 1);
                break;
            }
        }
        if let Some(next) = restart {
            // The lists read so far are not all whole from here on (nor read once).
            whole = false;
            from = next;
            continue;
        }
        read += chunks;
        chunks = next_chunks(chunks, read, need - out.len(), out.len());
        from = to;
    }
    if whole && from >= end {
        for g in to_read {
            view.full.insert(g, seen.remove(&g).unwrap_or_default());
        }
    }
    out.truncate(need);
    Ok(out)
}

impl Directory {
    pub(crate) async fn user_by_id<C: ConnectionTrait>(
        db: &C,
        id: &str,
    ) -> Result<user::Model, Error> {
        util::check_uuid("id", id)?;
        user::Entity::find()
            .filter(user::Column::Id.eq(id))
            .one(db)
            .await?
            .ok_or_else(|| Error::NotFound(format!("user {id}")))
    }

    pub async fn create_user(&self, user: Option<User>) -> Result<User, Error> {
        let user = user.ok_or_else(|| Error::invalid("user", "user is required"))?;
        let fields = UserFields::from_proto(&user)
            .validated("user.")
            .map_err(|(field, message)| Error::Invalid { field, message })?;
        let row = new_row(&fields, UserSource::Local, now_micros());
        let txn = search_index::write_txn(&self.db).await?;
        match insert_users(&txn, vec![row], &mut |_| {}).await {
            Ok(()) => {}
            Err(Error::Storage(e)) if util::unique_violation(&e) => {
                return Err(Error::AlreadyExists(format!(
                    "a user named {:?} already exists (usernames are compared case- and accent-insensitively)",
                    fields.username
                )));
            }
            Err(e) => return Err(e),
        }
        txn.commit().await?;
        let m = user::Entity::find()
            .filter(user::Column::UsernameKey.eq(normalize::fold(&fields.username)))
            .one(&self.db)
            .await?
            .ok_or_else(|| Error::Internal("created user vanished".into()))?;
        tracing::info!(user = %m.id, "user created");
        Ok(to_proto(&m))
    }

    pub async fn get_user(&self, id: &str) -> Result<User, Error> {
        Ok(to_proto(&Self::user_by_id(&self.db, id).await?))
    }

    pub async fn update_user(
        &self,
        user: Option<User>,
        mask: Option<prost_types::FieldMask>,
    ) -> Result<User, Error> {
        let user = user.ok_or_else(|| Error::invalid("user", "user is required"))?;
        let paths = mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            return Err(Error::invalid(
                "update_mask",
                "update_mask is required (e.g. \"email\", \"phone\", \"org_unit\")",
            ));
        }
        let txn = search_index::write_txn(&self.db).await?;
        let current = Self::user_by_id(&txn, &user.id).await?;
        if !user.etag.is_empty() && user.etag != current.revision.to_string() {
            return Err(Error::Conflict(format!(
                "user {} changed since it was read (etag {} is now {}): reload it and apply the change again",
                user.id, user.etag, current.revision
            )));
        }
        let mut fields = UserFields::of(&current);
        let mut status = current.status;
        for path in &paths {
            match path.as_str() {
                "username" => fields.username = user.username.clone(),
                "display_name" => fields.display_name = user.display_name.clone(),
                "email" => fields.email = user.email.clone(),
                "phone" => fields.phone = user.phone.clone(),
                "org_unit" => fields.org_unit = user.org_unit.clone(),
                "external_id" => fields.external_id = user.external_id.clone(),
                "status" => {
                    status = match UserStatus::try_from(user.status) {
                        Ok(UserStatus::Active) => UserStatus::Active as i32,
                        Ok(UserStatus::Disabled) => UserStatus::Disabled as i32,
                        _ => {
                            return Err(Error::invalid(
                                "user.status",
                                "status can be set to USER_STATUS_ACTIVE or USER_STATUS_DISABLED",
                            ));
                        }
                    }
                }
                other => {
                    return Err(Error::invalid(
                        "update_mask",
                        format!(
                            "update_mask names {other:?}, which is not an updatable field (username, display_name, email, phone, org_unit, external_id, status)"
                        ),
                    ));
                }
            }
        }
        let fields = fields
            .validated("user.")
            .map_err(|(field, message)| Error::Invalid { field, message })?;
        let serials = serials_of(&txn, &current.id).await?;
        let mut am = user::ActiveModel {
            status: Set(status),
            updated_at: Set(now_micros()),
            revision: Set(current.revision + 1),
            ..Default::default()
        };
        if status == UserStatus::Active as i32 && current.status != status {
            am.failed_attempts = Set(0);
            am.locked_until = Set(None);
        }
        fields.apply(&mut am, &serials);
        let mut changes = Changes::default();
        am.sort_rank = Set(reindex(&txn, &current, &am, &mut changes).await?);
        let result = user::Entity::update_many()
            .set(am)
            .filter(user::Column::Num.eq(current.num))
            .filter(user::Column::Revision.eq(current.revision))
            .exec(&txn)
            .await;
        match result {
            Ok(r) if r.rows_affected == 1 => {}
            Ok(_) => {
                return Err(Error::Conflict(format!(
                    "user {} changed concurrently: reload it and apply the change again",
                    user.id
                )));
            }
            Err(e) if util::unique_violation(&e) => {
                return Err(Error::AlreadyExists(format!(
                    "a user named {:?} already exists",
                    fields.username
                )));
            }
            Err(e) => return Err(e.into()),
        }
        search_index::apply(&txn, changes).await?;
        txn.commit().await?;
        self.get_user(&user.id).await
    }

    pub async fn disable_user(&self, id: &str, reason: &str) -> Result<User, Error> {
        check_text("reason", reason, 1_000, false)?;
        let current = Self::user_by_id(&self.db, id).await?;
        if current.status != UserStatus::Disabled as i32 {
            user::Entity::update_many()
                .set(user::ActiveModel {
                    status: Set(UserStatus::Disabled as i32),
                    updated_at: Set(now_micros()),
                    revision: Set(current.revision + 1),
                    ..Default::default()
                })
                .filter(user::Column::Num.eq(current.num))
                .exec(&self.db)
                .await?;
            tracing::info!(user = %id, "user disabled");
        }
        self.get_user(id).await
    }

    /// Recomputes a user's search document after its credentials changed.
    /// The posting list changes are left in `changes`, to apply with others.
    pub(crate) async fn refresh_search<C: ConnectionTrait>(
        db: &C,
        m: &user::Model,
        changes: &mut Changes,
    ) -> Result<(), Error> {
        let serials = serials_of(db, &m.id).await?;
        let mut am = user::ActiveModel::default();
        UserFields::of(m).apply(&mut am, &serials);
        reindex(db, m, &am, changes).await?;
        let am = user::ActiveModel {
            search_doc: am.search_doc,
            prefix_doc: am.prefix_doc,
            ..Default::default()
        };
        user::Entity::update_many()
            .set(am)
            .filter(user::Column::Num.eq(m.num))
            .exec(db)
            .await?;
        Ok(())
    }

    /// The helpdesk search: every user whose display name, username, email or card serial
    /// contains the folded query; users with a word starting with the query first (tier 0),
    /// then the other substring matches (tier 1), each tier by display name, username and id.
    /// Paged with a keyset token, so pages are stable while users are added.
    pub async fn search_users(
        &self,
        req: &SearchUsersRequest,
    ) -> Result<SearchUsersResponse, Error> {
        check_text("query", &req.query, MAX_QUERY, false)?;
        let q = normalize::query(&normalize::fold(&req.query));
        let q_serial = normalize::serial(&req.query);
        let limit = util::page_size(req.page.as_ref());
        let filters = Filters::of(req)?;

        let token = util::page_token(req.page.as_ref());
        let mut after: Option<(u8, [String; 3])> = None;
        if !token.is_empty() {
            let parts = token::decode(token, 4)?;
            let tier: u8 = match parts[0].as_str() {
                "0" => 0,
                "1" if !q.is_empty() => 1,
                _ => {
                    return Err(Error::invalid(
                        "page.page_token",
                        "not a page token of this search",
                    ));
                }
            };
            after = Some((tier, [parts[1].clone(), parts[2].clone(), parts[3].clone()]));
        }
        // One snapshot for every statement of the search.
        let txn = search_index::read_txn(&self.db).await?;
        let mut view = IndexView::read(&txn, &q).await?;
        let first_tier = after.as_ref().map(|(t, _)| *t).unwrap_or(0);
        let last_tier = if q.is_empty() { 0 } else { 1 };
        // An exact external id comes with the word starts (tier 0), and not again after.
        let external = if q.is_empty() {
            Vec::new()
        } else {
            external_ids(&req.query)
        };
        let later = Filters {
            not_external: external.clone(),
            ..filters.clone()
        };
        let mut page: Vec<(user::Model, u8)> = Vec::new();
        for tier in first_tier..=last_tier {
            let need = limit + 1 - page.len();
            let keyset = after.as_ref().filter(|(t, _)| *t == tier).map(|(_, k)| k);
            let filters = if tier == 0 { &filters } else { &later };
            let mut rows = search_tier(&txn, &mut view, &q, tier, filters, keyset, need).await?;
            if tier == 0 && !external.is_empty() {
                rows.extend(external_id_matches(&txn, &external, filters, keyset, need).await?);
                rows.sort_by(|a, b| {
                    (&a.display_key, &a.username_key, &a.id).cmp(&(
                        &b.display_key,
                        &b.username_key,
                        &b.id,
                    ))
                });
                rows.dedup_by(|a, b| a.id == b.id);
                rows.truncate(need);
            }
            page.extend(rows.into_iter().map(|m| (m, tier)));
            if page.len() > limit {
                break;
            }
        }
        let more = page.len() > limit;
        let total_estimate = if token.is_empty() && !more {
            page.len() as u64
        } else {
            estimate(&txn, &view, &q)
                .await?
                .max(page.len() as u64 + u64::from(more))
        };
        page.truncate(limit);
        let next = match (more, page.last()) {
            (true, Some((m, tier))) => {
                token::encode(&[&tier.to_string(), &m.display_key, &m.username_key, &m.id])
            }
            _ => String::new(),
        };
        let page: Vec<(user::Model, i32)> =
            page.into_iter().map(|(m, t)| (m, i32::from(t))).collect();

        // The credentials of the users on this page, for counts and serial matches.
        let user_ids: Vec<String> = page.iter().map(|(m, _)| m.id.clone()).collect();
        let creds = if user_ids.is_empty() {
            Vec::new()
        } else {
            credential::Entity::find()
                .filter(credential::Column::UserId.is_in(user_ids))
                .order_by_desc(credential::Column::IssuedAt)
                .all(&txn)
                .await?
        };
        txn.commit().await?;
        let results = page
            .into_iter()
            .map(|(m, rank)| {
                let own: Vec<&credential::Model> =
                    creds.iter().filter(|c| c.user_id == m.id).collect();
                let mut matched_fields = Vec::new();
                let mut matched_credentials = Vec::new();
                if !q.is_empty() {
                    let has = |folded: &str| normalize::without_marks(folded).contains(&q);
                    if has(&normalize::fold(&m.username)) {
                        matched_fields.push(MatchField::Username as i32);
                    }
                    if has(&m.display_key) {
                        matched_fields.push(MatchField::DisplayName as i32);
                    }
                    if has(&normalize::fold(&m.email)) {
                        matched_fields.push(MatchField::Email as i32);
                    }
                    if external.contains(&m.external_id) {
                        matched_fields.push(MatchField::ExternalId as i32);
                    }
                    for c in &own {
                        if (!q_serial.is_empty() && c.serial_key.contains(&q_serial))
                            || normalize::fold(&c.serial).contains(&q)
                        {
                            matched_credentials.push(crate::credentials::to_proto(c));
                        }
                    }
                    if !matched_credentials.is_empty() {
                        matched_fields.push(MatchField::CardSerial as i32);
                    }
                }
                UserSearchResult {
                    user: Some(to_proto(&m)),
                    matched_fields,
                    prefix_match: !q.is_empty() && rank == 0,
                    matched_credentials,
                    credential_count: u32::try_from(own.len()).unwrap_or(u32::MAX),
                }
            })
            .collect();
        Ok(SearchUsersResponse {
            results,
            page: Some(PageResponse {
                next_page_token: next,
                total_estimate,
            }),
        })
    }
}

/// About how many users a search for folded query `q` finds (filters and external ids not
/// counted): at most as many as have the rarest of the grams every substring match has;
/// without such grams (empty and short queries), the number of users.
async fn estimate<C: ConnectionTrait>(db: &C, view: &IndexView, q: &str) -> Result<u64, Error> {
    let grams = if q.is_empty() {
        Vec::new()
    } else {
        search_index::query_grams(q, 1)
    };
    let rarest = grams
        .iter()
        .map(|g| view.counts.get(g).copied().unwrap_or(0))
        .min();
    let count = match rarest {
        Some(n) => n,
        None => {
            // Row numbers are never reused and users are never deleted: the last is the count.
            let row = db
                .query_one_raw(sea_orm::Statement::from_string(
                    db.get_database_backend(),
                    "SELECT coalesce(max(num), 0) AS n FROM users",
                ))
                .await?;
            match row {
                Some(row) => row.try_get::<i64>("", "n")?,
                None => 0,
            }
        }
    };
    Ok(u64::try_from(count).unwrap_or(0))
}
