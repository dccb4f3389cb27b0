//! Users: create, read, update, disable, and the helpdesk search.

use cms_proto::directory::v1::{EnrolmentStatus, TotpState, User, UserSource, UserStatus};
use sea_orm::ActiveValue::Set;
use sea_orm::{ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QueryOrder};

use crate::entity::{credential, user};
use crate::normalize;
use crate::search::{self, Changes, Key};
use crate::util::{self, Sql, check_text, now_micros, timestamp};
use crate::{Directory, Error};

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
    let ranks = search::place(db, &keys, &mut changes).await?;
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
    search::apply(db, changes).await
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
    let ranks = search::place(db, &keys, &mut changes).await?;
    let columns: Vec<&str> = shared
        .iter()
        .map(|(name, _)| *name)
        .chain(OWN_COLUMNS.iter().map(|c| c.as_str()))
        .collect();
    let backend = db.get_database_backend();
    let total = keys.len();
    for round in (0..total).step_by(BULK_ROUND) {
        let round = round..(round + BULK_ROUND).min(total);
        let docs: Vec<String> = round
            .clone()
            .map(|j| {
                let (k, email) = (&keys[j], normalize::fold(&fields[slots[j]].email));
                normalize::search_doc_of_folded(&k.display, &k.username, &email, &[])
            })
            .collect();
        // The posting lists are gathered on another thread meanwhile (CPU work only).
        let docs = std::sync::Arc::new(docs);
        let gathered = {
            let docs = docs.clone();
            let ranks = ranks[round.clone()].to_vec();
            let mut changes = std::mem::take(&mut changes);
            tokio::task::spawn_blocking(move || {
                changes.add_docs(ranks.into_iter().zip(docs.iter().map(String::as_str)));
                changes
            })
        };
        let statements = round.clone().step_by(INSERT_BATCH).map(|start| {
            let end = (start + INSERT_BATCH).min(round.end);
            let rows = (start..end).map(|j| {
                let (k, f, doc) = (&keys[j], fields[slots[j]], &docs[j - round.start]);
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
        search::run_overlapped(db, statements, &mut |ran| {
            progress((round.start + ran * INSERT_BATCH).min(round.end));
        })
        .await?;
        let round_changes = gathered
            .await
            .map_err(|e| Error::Internal(format!("gathering posting lists: {e}")))?;
        search::apply(db, round_changes).await?;
    }
    Ok(())
}

/// Users per round of [`insert_new_users`]: their rows are written and their postings
/// gathered and written before the next round's, so that a bulk import holds the postings of
/// this many users at a time (for a million at once, they took gigabytes). Each round
/// rewrites the last chunk of the lists it adds to: fewer rounds are faster.
const BULK_ROUND: usize = 100_000;

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
        search::unrank(db, current.num).await?;
        let key = Key {
            display: display.clone(),
            username: username.clone(),
            id: current.id.clone(),
        };
        rank = search::place(db, &[key], changes).await?[0];
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
        let txn = search::write_txn(&self.db).await?;
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
        let txn = search::write_txn(&self.db).await?;
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
        search::apply(&txn, changes).await?;
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
}
