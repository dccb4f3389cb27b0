//! Users: create, read, update, disable, and the helpdesk search.

use cms_proto::common::v1::PageResponse;
use cms_proto::directory::v1::{
    EnrolmentStatus, MatchField, SearchUsersRequest, SearchUsersResponse, TotpState, User,
    UserSearchResult, UserSource, UserStatus,
};
use sea_orm::ActiveValue::Set;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    TransactionTrait,
};

use crate::entity::{credential, user, user_word};
use crate::normalize::{self, FIELD_SEP};
use crate::util::{self, Sql, check_text, now_micros, timestamp};
use crate::{Directory, Error, token};

pub const MAX_USERNAME: usize = 128;
pub const MAX_DISPLAY_NAME: usize = 256;
pub const MAX_EMAIL: usize = 320;
pub const MAX_ORG_UNIT: usize = 512;
pub const MAX_EXTERNAL_ID: usize = 256;
/// Longest search query, in characters.
pub const MAX_QUERY: usize = 256;

/// `text` as a literal GLOB pattern piece (`*`, `?` and `[` in brackets).
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '*' | '?' | '[' => {
                out.push('[');
                out.push(c);
                out.push(']');
            }
            c => out.push(c),
        }
    }
    out
}

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
            check_text(&f(name), value, max, required).map_err(|e| match e {
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

    /// Sets the stored columns derived from these fields (keys and search documents);
    /// returns the word-start document (for `user_words`).
    pub fn apply(&self, am: &mut user::ActiveModel, serials: &[String]) -> String {
        am.username = Set(self.username.clone());
        am.username_key = Set(normalize::fold(&self.username));
        am.display_name = Set(self.display_name.clone());
        am.display_key = Set(normalize::fold(&self.display_name));
        am.email = Set(self.email.clone());
        am.phone = Set(self.phone.clone());
        am.org_unit = Set(self.org_unit.clone());
        am.external_id = Set(self.external_id.clone());
        let doc = normalize::search_doc(&self.display_name, &self.username, &self.email, serials);
        let prefix = normalize::prefix_doc(&doc);
        am.prefix_doc = Set(prefix.clone());
        am.search_doc = Set(doc);
        prefix
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
    let _ = fields.apply(&mut am, &[]);
    am
}

/// Inserts the `user_words` rows of new users, given as (user id, word-start document).
pub async fn insert_words<C: ConnectionTrait>(
    db: &C,
    users: &[(String, String)],
) -> Result<(), Error> {
    let rows: Vec<user_word::ActiveModel> = users
        .iter()
        .flat_map(|(id, doc)| {
            normalize::words(doc)
                .into_iter()
                .map(move |word| user_word::ActiveModel {
                    word: Set(word),
                    user_id: Set(id.clone()),
                })
        })
        .collect();
    for chunk in rows.chunks(5_000) {
        user_word::Entity::insert_many(chunk.to_vec())
            .exec(db)
            .await?;
    }
    Ok(())
}

/// Updates a user's `user_words` rows after its word-start document changed.
pub async fn replace_words<C: ConnectionTrait>(
    db: &C,
    user_id: &str,
    old_doc: &str,
    new_doc: &str,
) -> Result<(), Error> {
    let old = normalize::words(old_doc);
    let new = normalize::words(new_doc);
    let gone: Vec<String> = old.iter().filter(|w| !new.contains(w)).cloned().collect();
    if !gone.is_empty() {
        user_word::Entity::delete_many()
            .filter(user_word::Column::UserId.eq(user_id))
            .filter(user_word::Column::Word.is_in(gone))
            .exec(db)
            .await?;
    }
    let added: Vec<user_word::ActiveModel> = new
        .into_iter()
        .filter(|w| !old.contains(w))
        .map(|word| user_word::ActiveModel {
            word: Set(word),
            user_id: Set(user_id.to_owned()),
        })
        .collect();
    if !added.is_empty() {
        user_word::Entity::insert_many(added).exec(db).await?;
    }
    Ok(())
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

/// Status and org-unit filters of a search, as SQL conditions on `u`.
struct Filters {
    statuses: Vec<UserStatus>,
    org_units: Vec<String>,
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
    }
}

/// The users of one search tier, in page order.
///
/// Candidates come from the trigram index (FTS5 on SQLite, pg_trgm on PostgreSQL) when they
/// are few; when the index finds more than `cap` (a dense query such as a common first name),
/// walking the (display name, username, id) index and filtering is cheaper than sorting them
/// all, so the query does that instead. `cap` balances both costs: about sqrt(page × users).
impl Directory {
    async fn search_tier(
        &self,
        q: &str,
        tier: u8,
        filters: &Filters,
        after: Option<&[String; 3]>,
        need: usize,
    ) -> Result<Vec<user::Model>, Error> {
        let backend = self.db.get_database_backend();
        let pg = backend == DbBackend::Postgres;
        let now = now_micros();
        let marker = format!("{FIELD_SEP}{q}");
        // Candidates from an index: word starts from the B-tree of `user_words` (tier 0),
        // substrings from the trigram index (tier 1, queries of 3 characters or more).
        if tier == 0 && q.chars().count() > normalize::PREFIX_CHARS {
            return Ok(Vec::new()); // longer than any stored word start: only substring matches
        }
        let mut candidates: Option<(bool, Vec<String>)> = None;
        let indexed = !q.is_empty() && (tier == 0 || q.chars().count() >= 3);
        if indexed {
            let users = self.user_count_estimate().await?;
            let cap = ((need as f64 * users as f64).sqrt() as usize).clamp(200, 20_000);
            let mut sql = Sql::new(backend);
            match (pg, tier) {
                (_, 0) => sql
                    .push("SELECT DISTINCT user_id AS c FROM user_words WHERE word >= ")
                    .bind(q.to_owned())
                    .push(" AND word < ")
                    .bind(format!("{q}\u{10FFFF}")),
                (true, _) => sql
                    .push("SELECT CAST(num AS TEXT) AS c FROM users WHERE search_doc LIKE ")
                    .bind(format!("%{}%", util::like_escape(q))),
                (false, _) => sql
                    .push("SELECT CAST(rowid AS TEXT) AS c FROM users_fts WHERE search_doc GLOB ")
                    .bind(format!("*{}*", glob_escape(q))),
            };
            sql.push(" LIMIT ")
                .bind(i64::try_from(cap + 1).unwrap_or(i64::MAX));
            let rows = self.db.query_all_raw(sql.statement()).await?;
            if rows.len() <= cap {
                if rows.is_empty() {
                    return Ok(Vec::new());
                }
                let mut keys = Vec::with_capacity(rows.len());
                for row in &rows {
                    keys.push(row.try_get::<String>("", "c")?);
                }
                candidates = Some((tier == 0, keys));
            }
        }
        // With candidates, the join order is forced (candidates first, then the users by id or
        // row number): left alone, both planners like to walk the name index for ORDER BY ...
        // LIMIT and test every user against the candidate list, a full scan when they are few.
        let mut sql = Sql::new(backend);
        match candidates {
            Some((by_id, keys)) => {
                let (column, cast) = if by_id {
                    ("id", "text")
                } else {
                    ("num", "bigint")
                };
                if pg {
                    sql.push(&format!(
                        "WITH c AS MATERIALIZED (SELECT u.* FROM users u WHERE u.{column} = ANY(string_to_array("
                    ))
                    .bind(keys.join(","))
                    .push(&format!(", ',')::{cast}[])) SELECT u.* FROM c u WHERE 1 = 1"));
                } else {
                    let json = if by_id {
                        format!("[\"{}\"]", keys.join("\",\""))
                    } else {
                        format!("[{}]", keys.join(","))
                    };
                    sql.push("SELECT u.* FROM json_each(")
                        .bind(json)
                        .push(&format!(
                            ") AS c CROSS JOIN users u ON u.{column} = c.value WHERE 1 = 1"
                        ));
                }
            }
            None => {
                sql.push("SELECT u.* FROM users u WHERE 1 = 1");
            }
        }
        let find = if pg { "strpos" } else { "instr" };
        match (q.is_empty(), tier) {
            (true, _) => {}
            (false, 0) => {
                sql.push(&format!(" AND {find}(u.prefix_doc, "))
                    .bind(marker.clone())
                    .push(") > 0");
            }
            (false, _) => {
                sql.push(&format!(" AND {find}(u.search_doc, "))
                    .bind(q.to_owned())
                    .push(&format!(") > 0 AND {find}(u.prefix_doc, "))
                    .bind(marker.clone())
                    .push(") = 0");
            }
        }
        filters.push(&mut sql, now);
        if let Some([display, username, id]) = after {
            sql.push(" AND (u.display_key, u.username_key, u.id) > (")
                .bind(display.clone())
                .push(", ")
                .bind(username.clone())
                .push(", ")
                .bind(id.clone())
                .push(")");
        }
        sql.push(" ORDER BY u.display_key, u.username_key, u.id LIMIT ")
            .bind(i64::try_from(need).unwrap_or(i64::MAX));
        let rows = self.db.query_all_raw(sql.statement()).await?;
        rows.iter()
            .map(|row| user::Model::from_query_result(row, "").map_err(Error::from))
            .collect()
    }

    /// About how many users there are (the highest row number): cheap on both databases.
    async fn user_count_estimate(&self) -> Result<i64, Error> {
        let row = self
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                self.db.get_database_backend(),
                "SELECT COALESCE(MAX(num), 0) AS n FROM users",
            ))
            .await?;
        Ok(match row {
            Some(r) => r.try_get::<i64>("", "n")?,
            None => 0,
        })
    }
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
        let words = match (&row.id, &row.prefix_doc) {
            (Set(id), Set(doc)) => vec![(id.clone(), doc.clone())],
            _ => Vec::new(),
        };
        let txn = self.db.begin().await?;
        match user::Entity::insert(row).exec(&txn).await {
            Ok(_) => {}
            Err(e) if util::unique_violation(&e) => {
                return Err(Error::AlreadyExists(format!(
                    "a user named {:?} already exists (usernames are compared case- and accent-insensitively)",
                    fields.username
                )));
            }
            Err(e) => return Err(e.into()),
        }
        insert_words(&txn, &words).await?;
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
        let txn = self.db.begin().await?;
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
        let prefix = fields.apply(&mut am, &serials);
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
        replace_words(&txn, &current.id, &current.prefix_doc, &prefix).await?;
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
    pub(crate) async fn refresh_search<C: ConnectionTrait>(
        db: &C,
        m: &user::Model,
    ) -> Result<(), Error> {
        let serials = serials_of(db, &m.id).await?;
        let mut am = user::ActiveModel::default();
        let prefix = UserFields::of(m).apply(&mut am, &serials);
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
        replace_words(db, &m.id, &m.prefix_doc, &prefix).await
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
        let q = normalize::fold(&req.query);
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
        let first_tier = after.as_ref().map(|(t, _)| *t).unwrap_or(0);
        let last_tier = if q.is_empty() { 0 } else { 1 };
        let mut page: Vec<(user::Model, u8)> = Vec::new();
        for tier in first_tier..=last_tier {
            let need = limit + 1 - page.len();
            let keyset = after.as_ref().filter(|(t, _)| *t == tier).map(|(_, k)| k);
            let rows = self.search_tier(&q, tier, &filters, keyset, need).await?;
            page.extend(rows.into_iter().map(|m| (m, tier)));
            if page.len() > limit {
                break;
            }
        }
        let more = page.len() > limit;
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
        let ids: Vec<String> = page.iter().map(|(m, _)| m.id.clone()).collect();
        let creds = if ids.is_empty() {
            Vec::new()
        } else {
            credential::Entity::find()
                .filter(credential::Column::UserId.is_in(ids))
                .order_by_desc(credential::Column::IssuedAt)
                .all(&self.db)
                .await?
        };
        let results = page
            .into_iter()
            .map(|(m, rank)| {
                let own: Vec<&credential::Model> =
                    creds.iter().filter(|c| c.user_id == m.id).collect();
                let mut matched_fields = Vec::new();
                let mut matched_credentials = Vec::new();
                if !q.is_empty() {
                    if normalize::fold(&m.username).contains(&q) {
                        matched_fields.push(MatchField::Username as i32);
                    }
                    if m.display_key.contains(&q) {
                        matched_fields.push(MatchField::DisplayName as i32);
                    }
                    if normalize::fold(&m.email).contains(&q) {
                        matched_fields.push(MatchField::Email as i32);
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
                total_estimate: 0,
            }),
        })
    }
}
