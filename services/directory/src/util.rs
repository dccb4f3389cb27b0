//! Small helpers shared by the handlers: time, paging, text checks, raw SQL with the
//! placeholders of either backend.

use cms_proto::common::v1::PageRequest;
use sea_orm::{DbBackend, Statement, Value};

use crate::Error;

pub const DEFAULT_PAGE: u32 = 50;
pub const MAX_PAGE: u32 = 500;

/// Microseconds since the Unix epoch.
pub fn now_micros() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

pub fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
    }
}

pub fn from_timestamp(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(t.nanos / 1_000))
}

pub fn page_size(page: Option<&PageRequest>) -> usize {
    let size = page.map(|p| p.page_size).unwrap_or(0);
    (if size == 0 {
        DEFAULT_PAGE
    } else {
        size.min(MAX_PAGE)
    }) as usize
}

pub fn page_token(page: Option<&PageRequest>) -> &str {
    page.map(|p| p.page_token.as_str()).unwrap_or("")
}

/// A text field: at most `max` characters, no control characters; `required` refuses blank.
pub fn check_text(field: &str, value: &str, max: usize, required: bool) -> Result<(), Error> {
    if required && value.trim().is_empty() {
        return Err(Error::invalid(field, format!("{field} is required")));
    }
    let n = value.chars().count();
    if n > max {
        return Err(Error::invalid(
            field,
            format!("{field} has {n} characters; at most {max} are allowed"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            format!("{field} contains a control character"),
        ));
    }
    Ok(())
}

pub fn check_uuid(field: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::invalid(field, format!("{field} is required")));
    }
    uuid::Uuid::parse_str(value)
        .map(drop)
        .map_err(|_| Error::invalid(field, format!("{field} is not a UUID")))
}

/// A new id: a UUIDv7, so ids are time-ordered and inserts append to the id index instead of
/// landing at random places in it (a third faster bulk imports).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

pub fn unique_violation(err: &sea_orm::DbErr) -> bool {
    matches!(
        err.sql_err(),
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
    )
}

/// Whether `err` says the database could not take the statement in time (SQLite busy or
/// locked past its busy timeout, no pooled connection free, PostgreSQL lock timeout,
/// deadlock or serialization failure): worth retrying, not an internal failure.
pub fn busy(err: &sea_orm::DbErr) -> bool {
    use sea_orm::{DbErr, RuntimeErr};
    let sqlx = match err {
        DbErr::ConnectionAcquire(_) => return true,
        DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e))
        | DbErr::Conn(RuntimeErr::SqlxError(e)) => e,
        _ => return false,
    };
    match sqlx.as_ref() {
        sea_orm::sqlx::Error::PoolTimedOut => true,
        sea_orm::sqlx::Error::Database(e) => {
            let code = e.code().unwrap_or_default();
            // PostgreSQL: serialization failure, deadlock, lock timeout; SQLite: SQLITE_BUSY
            // and SQLITE_LOCKED with their extended codes.
            matches!(code.as_ref(), "40001" | "40P01" | "55P03")
                || code
                    .parse::<u32>()
                    .is_ok_and(|n| n < 10_000 && matches!(n & 0xff, 5 | 6))
        }
        _ => false,
    }
}

/// `text` escaped for LIKE with `\` as the escape character.
pub fn like_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Raw SQL built with parameters only (never with values spliced into the text).
pub struct Sql {
    pub backend: DbBackend,
    pub text: String,
    pub values: Vec<Value>,
}

impl Sql {
    pub fn new(backend: DbBackend) -> Self {
        Self {
            backend,
            text: String::new(),
            values: Vec::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Appends a placeholder bound to `value`.
    pub fn bind(&mut self, value: impl Into<Value>) -> &mut Self {
        self.values.push(value.into());
        if self.backend == DbBackend::Postgres {
            let n = self.values.len();
            self.text.push_str(&format!("${n}"));
        } else {
            self.text.push('?');
        }
        self
    }

    /// Appends one row of a `VALUES` list, `(?, ?, …)` bound to `values`, after a comma unless
    /// it is the `first`.
    pub fn tuple(&mut self, first: bool, values: impl IntoIterator<Item = Value>) -> &mut Self {
        self.push(if first { "(" } else { ", (" });
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.bind(value);
        }
        self.push(")")
    }

    pub fn statement(self) -> Statement {
        Statement::from_sql_and_values(self.backend, self.text, self.values)
    }
}
