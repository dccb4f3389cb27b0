//! `audit_record`'s columns, listed once: the order the SQLite writer and the PostgreSQL
//! sink write them in, and which of them the record hash covers, in which order. A column
//! added to the table is added here, and to the hash only as [`Hashed::WhenNotEmpty`] (the
//! records written before it must keep their hashes).

use ring::digest;

use super::CHAIN_ID;
use crate::store::entities::audit_record::Model;

/// A column's value, borrowed from a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Value<'a> {
    I64(i64),
    I32(i32),
    Text(&'a str),
    Bytes(&'a [u8]),
    MaybeBytes(Option<&'a [u8]>),
}

/// A column's value, moved out of a record (no string or byte string is copied).
pub(super) enum Owned {
    I64(i64),
    I32(i32),
    Text(String),
    Bytes(Vec<u8>),
    MaybeBytes(Option<Vec<u8>>),
}

/// Whether, and how, the record hash covers a column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Hashed {
    /// The link to the record before: hashed first, right after the chain id.
    Link,
    /// Hashed, in column order.
    Always,
    /// Hashed, in column order, only when not empty.
    WhenNotEmpty,
    /// Not hashed: the hash itself, and the usage fingerprints kept beside the chain.
    Never,
}

pub(super) struct Column {
    pub(super) name: &'static str,
    pub(super) hashed: Hashed,
    pub(super) get: for<'a> fn(&'a Model) -> Value<'a>,
    pub(super) take: fn(&mut Model) -> Owned,
}

macro_rules! column {
    ($field:ident, I64, $hashed:ident) => {
        column!(@ $field, $hashed, |r| Value::I64(r.$field), |r| Owned::I64(r.$field))
    };
    ($field:ident, I32, $hashed:ident) => {
        column!(@ $field, $hashed, |r| Value::I32(r.$field), |r| Owned::I32(r.$field))
    };
    ($field:ident, Text, $hashed:ident) => {
        column!(@ $field, $hashed, |r| Value::Text(r.$field.as_str()), |r| {
            Owned::Text(std::mem::take(&mut r.$field))
        })
    };
    ($field:ident, Bytes, $hashed:ident) => {
        column!(@ $field, $hashed, |r| Value::Bytes(r.$field.as_slice()), |r| {
            Owned::Bytes(std::mem::take(&mut r.$field))
        })
    };
    ($field:ident, MaybeBytes, $hashed:ident) => {
        column!(@ $field, $hashed, |r| Value::MaybeBytes(r.$field.as_deref()), |r| {
            Owned::MaybeBytes(r.$field.take())
        })
    };
    (@ $field:ident, $hashed:ident, $get:expr, $take:expr) => {
        Column {
            name: stringify!($field),
            hashed: Hashed::$hashed,
            get: $get,
            take: $take,
        }
    };
}

/// Every column of `audit_record`, in the order rows are written.
pub(super) const COLUMNS: [Column; 20] = [
    column!(seq, I64, Always),
    column!(at, I64, Always),
    column!(event, I32, Always),
    column!(outcome, I32, Always),
    column!(caller, Text, Always),
    column!(actor_kind, I32, Always),
    column!(actor_id, Text, Always),
    column!(user_id, Text, Always),
    column!(card_id, Bytes, Always),
    column!(flow, I32, Always),
    column!(approval_id, Text, Always),
    column!(request_id, Text, Always),
    column!(key_reference, Text, Always),
    column!(key_version, I32, Always),
    column!(reason, Text, Always),
    column!(prev_hash, Bytes, Link),
    column!(hash, Bytes, Never),
    column!(card_fp, MaybeBytes, Never),
    column!(challenge_fp, MaybeBytes, Never),
    column!(attributes, Text, WhenNotEmpty),
];

/// The column names, comma-separated, in [`COLUMNS`] order.
pub(super) fn names() -> String {
    COLUMNS.map(|c| c.name).join(", ")
}

impl Value<'_> {
    fn is_empty(&self) -> bool {
        match self {
            Self::Text(text) => text.is_empty(),
            Self::Bytes(bytes) => bytes.is_empty(),
            Self::MaybeBytes(bytes) => bytes.is_none_or(<[u8]>::is_empty),
            Self::I64(_) | Self::I32(_) => false,
        }
    }

    /// Feeds the value to `put`: integers big-endian at their width, text as UTF-8.
    fn put(&self, put: &mut impl FnMut(&[u8])) {
        match self {
            Self::I64(v) => put(&v.to_be_bytes()),
            Self::I32(v) => put(&v.to_be_bytes()),
            Self::Text(text) => put(text.as_bytes()),
            Self::Bytes(bytes) => put(bytes),
            Self::MaybeBytes(bytes) => put(bytes.unwrap_or_default()),
        }
    }
}

/// SHA-256 over the chain id, the previous hash and the hashed columns, each
/// length-prefixed, in [`COLUMNS`] order.
pub fn record_hash(r: &Model) -> Vec<u8> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut put = |bytes: &[u8]| {
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(bytes);
    };
    put(CHAIN_ID.as_bytes());
    for column in COLUMNS.iter().filter(|c| c.hashed == Hashed::Link) {
        (column.get)(r).put(&mut put);
    }
    for column in &COLUMNS {
        let value = (column.get)(r);
        match column.hashed {
            Hashed::Always => value.put(&mut put),
            Hashed::WhenNotEmpty if !value.is_empty() => value.put(&mut put),
            Hashed::WhenNotEmpty | Hashed::Link | Hashed::Never => {}
        }
    }
    ctx.finish().as_ref().to_vec()
}

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match *self {
            Self::I64(v) => ToSqlOutput::from(v),
            Self::I32(v) => ToSqlOutput::from(v),
            Self::Text(text) => ToSqlOutput::Borrowed(ValueRef::Text(text.as_bytes())),
            Self::Bytes(bytes) => ToSqlOutput::Borrowed(ValueRef::Blob(bytes)),
            Self::MaybeBytes(Some(bytes)) => ToSqlOutput::Borrowed(ValueRef::Blob(bytes)),
            Self::MaybeBytes(None) => ToSqlOutput::Borrowed(ValueRef::Null),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(attributes: &str) -> Model {
        Model {
            seq: 7,
            at: 1_764_000_000_123,
            event: 3,
            outcome: 1,
            caller: "spiffe://cms.test/cms/gateway".into(),
            actor_kind: 1,
            actor_id: "helpdesk-7".into(),
            user_id: "u-42".into(),
            card_id: vec![1, 2, 3],
            flow: 2,
            approval_id: "ap-1".into(),
            request_id: "req-1".into(),
            key_reference: "mk".into(),
            key_version: 2,
            reason: "scheme sp800-108-cmac".into(),
            prev_hash: vec![9; 32],
            hash: vec![8; 32],
            card_fp: Some(vec![5; 32]),
            challenge_fp: None,
            attributes: attributes.into(),
        }
    }

    /// The record hash as custody computed it before the columns were listed here, field by
    /// field: records written then must still verify.
    fn hash_as_written_before(r: &Model) -> Vec<u8> {
        let mut ctx = digest::Context::new(&digest::SHA256);
        let mut put = |bytes: &[u8]| {
            ctx.update(&(bytes.len() as u64).to_be_bytes());
            ctx.update(bytes);
        };
        put(CHAIN_ID.as_bytes());
        put(&r.prev_hash);
        put(&r.seq.to_be_bytes());
        put(&r.at.to_be_bytes());
        put(&r.event.to_be_bytes());
        put(&r.outcome.to_be_bytes());
        put(r.caller.as_bytes());
        put(&r.actor_kind.to_be_bytes());
        put(r.actor_id.as_bytes());
        put(r.user_id.as_bytes());
        put(&r.card_id);
        put(&r.flow.to_be_bytes());
        put(r.approval_id.as_bytes());
        put(r.request_id.as_bytes());
        put(r.key_reference.as_bytes());
        put(&r.key_version.to_be_bytes());
        put(r.reason.as_bytes());
        if !r.attributes.is_empty() {
            put(r.attributes.as_bytes());
        }
        ctx.finish().as_ref().to_vec()
    }

    #[test]
    fn the_hash_is_the_one_records_were_written_with() {
        for attributes in ["", r#"{"step":"begin"}"#] {
            let r = record(attributes);
            assert_eq!(
                record_hash(&r),
                hash_as_written_before(&r),
                "{attributes:?}"
            );
        }
    }

    #[test]
    fn every_column_is_listed_once_and_moves_out_whole() {
        let names = names();
        assert_eq!(names.split(", ").count(), 20);
        let mut r = record("{}");
        let before = record("{}");
        for column in &COLUMNS {
            let expected = (column.get)(&before);
            let moved = (column.take)(&mut r);
            let same = match (&moved, expected) {
                (Owned::I64(a), Value::I64(b)) => *a == b,
                (Owned::I32(a), Value::I32(b)) => *a == b,
                (Owned::Text(a), Value::Text(b)) => a == b,
                (Owned::Bytes(a), Value::Bytes(b)) => a == b,
                (Owned::MaybeBytes(a), Value::MaybeBytes(b)) => a.as_deref() == b,
                _ => false,
            };
            assert!(same, "column {}", column.name);
        }
    }
}
