//! Bulk import of users, from CSV (ImportUsers) or LDAP (SyncLdap): parse and validate every
//! line first, then apply everything in one transaction — or nothing. Idempotent: importing the
//! same input again changes nothing and reports every user as unchanged.

use std::collections::{BTreeMap, HashMap, HashSet};

use cms_proto::directory::v1::{ImportError, ImportReport, UserSource, UserStatus};
use sea_orm::ActiveValue::Set;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter};

use crate::csv_upload::Utf8Chunks;
use crate::entity::{credential, user};
use crate::normalize;
use crate::search::{self, Changes};
use crate::users::{INSERT_BATCH, UserFields, insert_new_users, reindex};
use crate::util::{Sql, now_micros, timestamp};
use crate::{Directory, Error};

/// Columns of the CSV, in the order assumed without a header.
pub const COLUMNS: [&str; 6] = [
    "username",
    "display_name",
    "email",
    "phone",
    "org_unit",
    "external_id",
];

/// SQLite page cache of a connection that ran an import, KiB.
const IMPORT_CACHE_KIB: u32 = 131_072;
/// Most errors reported for one input.
const MAX_ERRORS: usize = 1_000;
/// Records from which on an import gives its memory back when done (see [`crate::memory`]):
/// a smaller one leaves little behind, and the pool's connections stay warm.
const LARGE_IMPORT: usize = 10_000;

/// One validated input record.
#[derive(Clone, Debug)]
pub struct Record {
    /// 1-based line (CSV) or entry index (LDAP).
    pub line: u64,
    pub fields: UserFields,
    /// The source marks this user disabled (an LDAP attribute); CSV records never are.
    pub disabled: bool,
}

/// What to do with existing and missing users.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub update_existing: bool,
    pub disable_missing: bool,
    pub dry_run: bool,
    /// A CSV import may change users that an LDAP sync owns (otherwise such a line is
    /// refused: the next sync would undo it).
    pub overwrite_ldap_users: bool,
}

/// A progress event of an import or sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub phase: &'static str,
    pub read: u64,
    pub applied: u64,
    pub total: u64,
}

fn error(line: u64, column: &str, message: impl Into<String>) -> ImportError {
    ImportError {
        line,
        column: column.to_owned(),
        message: message.into(),
    }
}

/// Parses a CSV file into records, or every problem found (with line numbers).
pub fn parse_csv(
    bytes: &[u8],
    has_header: bool,
    delimiter: u8,
) -> Result<Vec<Record>, Vec<ImportError>> {
    let chunks = bytes.chunks(64 * 1024).map(<[u8]>::to_vec);
    parse_source(Utf8Chunks::new(chunks), has_header, delimiter)
}

/// Parses the CSV that `source` reads (as it arrives), as [`parse_csv`].
pub(crate) fn parse_source<I: Iterator<Item = Vec<u8>>>(
    mut source: Utf8Chunks<I>,
    has_header: bool,
    delimiter: u8,
) -> Result<Vec<Record>, Vec<ImportError>> {
    let mut last_start = 0u64;
    let mut header_only = false;
    let mut header_failed = false;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(delimiter)
        .from_reader(&mut source);
    let mut errors = Vec::new();
    let mut records = Vec::new();
    let mut columns: Vec<usize> = (0..COLUMNS.len()).collect();
    let mut expected = COLUMNS.len();
    let mut seen_names: HashMap<String, u64> = HashMap::new();
    let mut seen_external: HashMap<String, u64> = HashMap::new();
    for (index, result) in reader.records().enumerate() {
        if errors.len() >= MAX_ERRORS {
            break;
        }
        let record = match result {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map(|p| p.line()).unwrap_or(0);
                errors.push(error(line, "", format!("not valid CSV: {e}")));
                continue;
            }
        };
        let line = record
            .position()
            .map(|p| p.line())
            .unwrap_or(index as u64 + 1);
        last_start = line;
        if index == 0 && has_header {
            header_only = true;
            columns.clear();
            let mut names = HashSet::new();
            for (i, name) in record.iter().enumerate() {
                let name = name.trim().to_ascii_lowercase();
                match COLUMNS.iter().position(|c| *c == name) {
                    Some(pos) => {
                        if !names.insert(pos) {
                            errors.push(error(
                                line,
                                &name,
                                format!("column {name:?} appears twice"),
                            ));
                        }
                        columns.push(pos);
                    }
                    None => {
                        errors.push(error(
                            line,
                            &name,
                            format!(
                                "unknown column {:?} (header column {}); expected some of: {}",
                                name,
                                i + 1,
                                COLUMNS.join(", ")
                            ),
                        ));
                        columns.push(usize::MAX);
                    }
                }
            }
            if !names.contains(&0) {
                errors.push(error(
                    line,
                    "username",
                    "the header has no \"username\" column",
                ));
            }
            expected = columns.len();
            if !errors.is_empty() {
                header_failed = true;
                break;
            }
            continue;
        }
        if record.len() == 1 && record.get(0).is_some_and(|f| f.trim().is_empty()) {
            continue; // blank line
        }
        if record.len() != expected {
            errors.push(error(
                line,
                "",
                format!(
                    "{} columns; expected {expected} ({})",
                    record.len(),
                    if has_header {
                        "as in the header".to_owned()
                    } else {
                        COLUMNS.join(", ")
                    }
                ),
            ));
            continue;
        }
        let mut values: [String; 6] = Default::default();
        for (i, field) in record.iter().enumerate() {
            if let Some(slot) = columns.get(i).and_then(|c| values.get_mut(*c)) {
                *slot = field.to_owned();
            }
        }
        let [username, display_name, email, phone, org_unit, external_id] = values;
        let fields = UserFields {
            username,
            display_name,
            email,
            phone,
            org_unit,
            external_id,
        };
        match fields.validated("") {
            Ok(fields) => {
                let key = normalize::fold(&fields.username);
                if let Some(first) = seen_names.insert(key, line) {
                    errors.push(error(
                        line,
                        "username",
                        format!(
                            "duplicate username {:?} (first at line {first})",
                            fields.username
                        ),
                    ));
                    continue;
                }
                if !fields.external_id.is_empty()
                    && let Some(first) = seen_external.insert(fields.external_id.clone(), line)
                {
                    errors.push(error(
                        line,
                        "external_id",
                        format!("duplicate external_id (first at line {first})"),
                    ));
                    continue;
                }
                records.push(Record {
                    line,
                    fields,
                    disabled: false,
                });
            }
            Err((column, message)) => errors.push(error(line, &column, message)),
        }
    }
    drop(reader);
    // The rest of the file after too many errors: only its bytes are checked and counted.
    let _ = std::io::copy(&mut source, &mut std::io::sink());
    if let Some(invalid) = source.invalid {
        return Err(vec![invalid]);
    }
    if header_failed {
        return Err(errors);
    }
    // In CSV, quotes come in pairs (open and close, or "" inside a quoted field): an odd
    // count means a quoted field runs to the end of the file.
    let unbalanced_quotes = source.quotes % 2 == 1;
    if unbalanced_quotes && last_start > 0 {
        // Whatever was said about the swallowed lines is a consequence, not the cause.
        errors.retain(|e| e.line < last_start);
        records.retain(|r| r.line < last_start);
        errors.push(error(
            last_start,
            "",
            format!("unterminated quote: a quoted field that starts on line {last_start} is never closed"),
        ));
    }
    if errors.is_empty() && records.is_empty() {
        errors.push(error(
            1,
            "",
            if header_only {
                "the file has a header but no users"
            } else {
                "the file is empty: no users to import"
            },
        ));
    }
    if errors.is_empty() {
        Ok(records)
    } else {
        Err(errors)
    }
}

/// The status an import sets on the existing user `m` for record `r`, when it changes: LDAP
/// owns its users' status (a user back in LDAP, or no longer marked disabled there, is enabled
/// again; one marked disabled there is disabled). A CSV import never changes a status, and a
/// locked user stays locked (a lockout is the directory's own).
fn source_status(source: UserSource, m: &user::Model, r: &Record) -> Option<UserStatus> {
    if source != UserSource::Ldap || m.source != UserSource::Ldap as i32 {
        return None;
    }
    let wanted = if r.disabled {
        UserStatus::Disabled
    } else {
        UserStatus::Active
    };
    let current = UserStatus::try_from(m.status).unwrap_or(UserStatus::Unspecified);
    match (current, wanted) {
        (UserStatus::Disabled, UserStatus::Active) => Some(UserStatus::Active),
        (UserStatus::Active | UserStatus::Locked, UserStatus::Disabled) => {
            Some(UserStatus::Disabled)
        }
        _ => None,
    }
}

/// One line per error, at most `max` of them, for a status message.
pub fn describe(errors: &[ImportError], max: usize) -> String {
    let mut text: Vec<String> = errors
        .iter()
        .take(max)
        .map(|e| {
            if e.column.is_empty() {
                format!("line {}: {}", e.line, e.message)
            } else {
                format!("line {}, column {}: {}", e.line, e.column, e.message)
            }
        })
        .collect();
    if errors.len() > max {
        text.push(format!("… and {} more", errors.len() - max));
    }
    format!("import refused, nothing was changed: {}", text.join("; "))
}

/// The users whose `column` is one of `keys` (one statement per 10,000 keys).
async fn existing_by<C: ConnectionTrait>(
    db: &C,
    column: &str,
    keys: &[&str],
) -> Result<Vec<user::Model>, Error> {
    let mut out = Vec::new();
    for chunk in keys.chunks(10_000) {
        let list = serde_json::to_string(chunk)
            .map_err(|e| Error::Internal(format!("a key list as JSON: {e}")))?;
        let mut sql = Sql::new(db.get_database_backend());
        sql.push(&format!("SELECT * FROM users WHERE {column} IN "));
        if db.get_database_backend() == sea_orm::DbBackend::Postgres {
            sql.push("(SELECT jsonb_array_elements_text(")
                .bind(list)
                .push("::jsonb))");
        } else {
            sql.push("(SELECT value FROM json_each(")
                .bind(list)
                .push("))");
        }
        for row in db.query_all_raw(sql.statement()).await? {
            out.push(user::Model::from_query_result(&row, "")?);
        }
    }
    Ok(out)
}

impl Directory {
    /// Applies `records` from `source` in one transaction (or only reports, on a dry run).
    pub async fn apply_import(
        &self,
        records: Vec<Record>,
        source: UserSource,
        options: Options,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<ImportReport, Error> {
        let large = records.len() >= LARGE_IMPORT;
        let trimmer = large.then(crate::memory::Trimmer::start);
        let outcome = self.apply_records(records, source, options, progress).await;
        drop(trimmer);
        // Everything the import held is freed by now (an error's too).
        if large {
            crate::memory::release_after_import(&self.db).await;
        }
        outcome
    }

    async fn apply_records(
        &self,
        records: Vec<Record>,
        source: UserSource,
        options: Options,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<ImportReport, Error> {
        let started = now_micros();
        let total = records.len() as u64;
        progress(Progress {
            phase: "matching",
            read: total,
            applied: 0,
            total,
        });
        let txn = search::write_txn(&self.db).await?;
        let sqlite = txn.get_database_backend() == sea_orm::DbBackend::Sqlite;
        // The connection's own cache size, set again when the import is done.
        let mut cache_size = None;
        if sqlite {
            if let Some(row) = txn
                .query_one_raw(sea_orm::Statement::from_string(
                    sea_orm::DbBackend::Sqlite,
                    "PRAGMA cache_size",
                ))
                .await?
            {
                cache_size = Some(row.try_get_by_index::<i64>(0)?);
            }
            // A bulk write touches far more pages than SQLite's default 2 MiB cache holds;
            // without room, dirty index pages are spilled and rewritten over and over.
            txn.execute_unprepared(&format!("PRAGMA cache_size = -{IMPORT_CACHE_KIB}"))
                .await?;
        }
        let keys: Vec<String> = records
            .iter()
            .map(|r| normalize::fold(&r.fields.username))
            .collect();
        let by_name: HashMap<String, user::Model> = existing_by(
            &txn,
            "username_key",
            &keys.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await?
        .into_iter()
        .map(|m| (m.username_key.clone(), m))
        .collect();
        let by_external: HashMap<String, user::Model> = existing_by(
            &txn,
            "external_id",
            &records
                .iter()
                .filter(|r| !r.fields.external_id.is_empty())
                .map(|r| r.fields.external_id.as_str())
                .collect::<Vec<_>>(),
        )
        .await?
        .into_iter()
        .filter(|m| !m.external_id.is_empty())
        .map(|m| (m.external_id.clone(), m))
        .collect();

        let mut creates = Vec::new();
        let mut updates: Vec<(&user::Model, &UserFields)> = Vec::new();
        // Users whose status the source sets: (num, new status).
        let mut statuses: Vec<(i64, UserStatus)> = Vec::new();
        let mut unchanged = 0u64;
        let mut matched: HashSet<i64> = HashSet::new();
        let mut errors = Vec::new();
        for (r, key) in records.iter().zip(&keys) {
            let found = by_external
                .get(&r.fields.external_id)
                .filter(|_| !r.fields.external_id.is_empty())
                .or_else(|| by_name.get(key));
            match found {
                None => creates.push(r),
                Some(m) => {
                    if let Some(other) = by_name.get(key)
                        && other.num != m.num
                    {
                        errors.push(error(
                            r.line,
                            "username",
                            format!(
                                "username {:?} belongs to another user than external_id {:?}",
                                r.fields.username, r.fields.external_id
                            ),
                        ));
                        continue;
                    }
                    if options.disable_missing {
                        matched.insert(m.num);
                    }
                    let changed = UserFields::of(m) != r.fields;
                    if source == UserSource::Csv
                        && m.source == UserSource::Ldap as i32
                        && options.update_existing
                        && changed
                        && !options.overwrite_ldap_users
                    {
                        errors.push(error(
                            r.line,
                            "username",
                            format!(
                                "user {:?} is synchronised from LDAP: the next sync would undo this change (allow it with overwrite_ldap_users)",
                                m.username
                            ),
                        ));
                        continue;
                    }
                    let status = source_status(source, m, r);
                    if let Some(status) = status {
                        statuses.push((m.num, status));
                    }
                    if options.update_existing && changed {
                        updates.push((m, &r.fields));
                    } else if status.is_some() {
                        // Counted as updated: its status changed.
                    } else {
                        unchanged += 1;
                    }
                }
            }
        }
        // A folded copy of every username is no longer needed: freed on another thread.
        let keys_freed = tokio::task::spawn_blocking(move || drop(keys));
        if !errors.is_empty() {
            return Err(Error::Import(describe(&errors, 20)));
        }
        let to_disable: Vec<i64> = if options.disable_missing {
            user::Entity::find()
                .filter(user::Column::Source.eq(source as i32))
                .filter(user::Column::Status.ne(UserStatus::Disabled as i32))
                .all(&txn)
                .await?
                .into_iter()
                .map(|m| m.num)
                .filter(|n| !matched.contains(n))
                .collect()
        } else {
            Vec::new()
        };
        let updated: HashSet<i64> = updates.iter().map(|(m, _)| m.num).collect();
        let status_only = statuses
            .iter()
            .filter(|(num, _)| !updated.contains(num))
            .count() as u64;
        drop(updated);
        let mut report = ImportReport {
            created: creates.len() as u64,
            updated: updates.len() as u64 + status_only,
            disabled: to_disable.len() as u64,
            unchanged,
            errors: Vec::new(),
            dry_run: options.dry_run,
            started_at: Some(timestamp(started)),
            finished_at: None,
        };
        if options.dry_run {
            txn.rollback().await?;
            report.finished_at = Some(timestamp(now_micros()));
            return Ok(report);
        }

        let now = now_micros();
        let fields: Vec<&UserFields> = creates.iter().map(|r| &r.fields).collect();
        let inserted = insert_new_users(&txn, &fields, source, now, &mut |n| {
            progress(Progress {
                phase: "applying",
                read: total,
                applied: n as u64,
                total,
            })
        })
        .await;
        match inserted {
            Ok(()) => {}
            Err(Error::Storage(e)) if crate::util::unique_violation(&e) => {
                return Err(Error::Conflict(
                    "another change created one of these users meanwhile; run the import again"
                        .into(),
                ));
            }
            Err(e) => return Err(e),
        }
        let mut applied = creates.len() as u64;
        if !updates.is_empty() {
            let ids: Vec<String> = updates.iter().map(|(m, _)| m.id.clone()).collect();
            let mut serials: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for chunk in ids.chunks(500) {
                for c in credential::Entity::find()
                    .filter(credential::Column::UserId.is_in(chunk.to_vec()))
                    .all(&txn)
                    .await?
                {
                    serials.entry(c.user_id).or_default().push(c.serial);
                }
            }
            let mut changes = Changes::default();
            for (i, (m, fields)) in updates.iter().enumerate() {
                let mut am = user::ActiveModel {
                    updated_at: Set(now),
                    revision: Set(m.revision + 1),
                    ..Default::default()
                };
                fields.apply(
                    &mut am,
                    serials.get(&m.id).map(Vec::as_slice).unwrap_or_default(),
                );
                am.sort_rank = Set(reindex(&txn, m, &am, &mut changes).await?);
                let result = user::Entity::update_many()
                    .set(am)
                    .filter(user::Column::Num.eq(m.num))
                    .exec(&txn)
                    .await;
                if let Err(e) = result {
                    return Err(if crate::util::unique_violation(&e) {
                        Error::Import(describe(
                            &[error(
                                0,
                                "username",
                                format!(
                                    "renaming user {} to {:?} collides with another user",
                                    m.id, fields.username
                                ),
                            )],
                            1,
                        ))
                    } else {
                        e.into()
                    });
                }
                applied += 1;
                if i % INSERT_BATCH == 0 {
                    progress(Progress {
                        phase: "applying",
                        read: total,
                        applied,
                        total,
                    });
                }
            }
            search::apply(&txn, changes).await?;
        }
        for (status, nums) in [UserStatus::Active, UserStatus::Disabled].map(|status| {
            let nums: Vec<i64> = statuses
                .iter()
                .filter(|(_, s)| *s == status)
                .map(|(n, _)| *n)
                .collect();
            (status, nums)
        }) {
            for chunk in nums.chunks(500) {
                user::Entity::update_many()
                    .set(user::ActiveModel {
                        status: Set(status as i32),
                        updated_at: Set(now),
                        ..Default::default()
                    })
                    .filter(user::Column::Num.is_in(chunk.to_vec()))
                    .exec(&txn)
                    .await?;
            }
        }
        for chunk in to_disable.chunks(500) {
            user::Entity::update_many()
                .set(user::ActiveModel {
                    status: Set(UserStatus::Disabled as i32),
                    updated_at: Set(now),
                    ..Default::default()
                })
                .filter(user::Column::Num.is_in(chunk.to_vec()))
                .exec(&txn)
                .await?;
        }
        drop((creates, fields, updates));
        // Freed on another thread while the commit runs.
        let freed =
            tokio::task::spawn_blocking(move || drop((records, by_name, by_external, matched)));
        if let Some(size) = cache_size {
            txn.execute_unprepared(&format!("PRAGMA cache_size = {size}"))
                .await?;
        }
        txn.commit().await?;
        search::checkpoint(&self.db).await;
        let _ = (freed.await, keys_freed.await);
        progress(Progress {
            phase: "done",
            read: total,
            applied,
            total,
        });
        report.finished_at = Some(timestamp(now_micros()));
        tracing::info!(
            created = report.created,
            updated = report.updated,
            disabled = report.disabled,
            unchanged = report.unchanged,
            source = source.as_str_name(),
            "import applied"
        );
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_errors_with_lines() {
        let csv = "username,email\njdoe,j@example.com\nbad,not-an-email\njdoe,x@example.com\n";
        let errors = parse_csv(csv.as_bytes(), true, b',').unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!((errors[0].line, errors[0].column.as_str()), (3, "email"));
        assert_eq!((errors[1].line, errors[1].column.as_str()), (4, "username"));
    }

    #[test]
    fn unknown_column_and_invalid_utf8() {
        let errors = parse_csv(b"username,shoe_size\n", true, b',').unwrap_err();
        assert!(errors[0].message.contains("shoe_size"), "{errors:?}");
        let errors = parse_csv(b"a,b,c,d,e,f\nok,x,,,,\n\xff\xfe,,,,,\n", false, b',').unwrap_err();
        assert_eq!(errors[0].line, 3, "{errors:?}");
        assert!(errors[0].message.contains("UTF-8"));
    }

    #[test]
    fn wrong_column_count_and_quotes() {
        let errors = parse_csv(b"a,b,c\n", false, b',').unwrap_err();
        assert!(
            errors[0].message.contains("3 columns; expected 6"),
            "{errors:?}"
        );
        let ok = parse_csv(
            "\"o'brien\",\"O'Brien, \"\"Bob\"\"\",,,,\n".as_bytes(),
            false,
            b',',
        )
        .unwrap();
        assert_eq!(ok[0].fields.display_name, "O'Brien, \"Bob\"");
    }

    #[test]
    fn an_empty_file_is_an_error() {
        for (csv, header, words) in [
            (&b""[..], true, "empty"),
            (b"\n\n", false, "empty"),
            (b"username,email\n", true, "header but no users"),
        ] {
            let errors = parse_csv(csv, header, b',').unwrap_err();
            assert!(errors[0].message.contains(words), "{errors:?}");
        }
    }

    #[test]
    fn an_unterminated_quote_is_named() {
        let csv = "username,display_name\nann,Ann\nbob,\"Bob\nca,Carl\ndan,Dan\n";
        let errors = parse_csv(csv.as_bytes(), true, b',').unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, 3);
        assert!(
            errors[0].message.contains("unterminated quote"),
            "{errors:?}"
        );
    }
}
