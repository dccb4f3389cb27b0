//! Users (card holders), with their self-service enrolment state. Times are microseconds
//! since the Unix epoch; enums are the proto enum numbers.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "users")]
pub struct Model {
    /// Row number: the key of the search index.
    #[sea_orm(primary_key)]
    pub num: i64,
    #[sea_orm(unique)]
    pub id: String,
    /// As given (stored verbatim).
    pub username: String,
    /// Folded username: unique.
    #[sea_orm(unique)]
    pub username_key: String,
    pub display_name: String,
    /// Folded display name: the first sort key of listings and searches.
    pub display_key: String,
    pub email: String,
    pub phone: String,
    pub org_unit: String,
    pub status: i32,
    pub external_id: String,
    pub source: i32,
    /// Folded display name, username, email and card serials (see `normalize::search_doc`).
    pub search_doc: String,
    /// Word starts of `search_doc` (see `normalize::prefix_doc`).
    pub prefix_doc: String,
    pub failed_attempts: i32,
    pub locked_until: Option<i64>,
    pub questions_enrolled: i32,
    pub questions_updated_at: Option<i64>,
    pub totp_state: i32,
    /// AEAD-sealed TOTP secret (see `secrets`), bound to the user id.
    pub totp_secret: Option<Vec<u8>>,
    /// `ALGORITHM:digits:period`.
    pub totp_params: String,
    pub totp_confirmed_at: Option<i64>,
    /// Last accepted time step: a code is never accepted twice.
    pub totp_last_step: i64,
    pub totp_pending_secret: Option<Vec<u8>>,
    pub totp_pending_params: String,
    pub totp_pending_until: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    /// Bumped by every change: the etag.
    pub revision: i64,
    /// Position in page order (display key, username key, id): ascending with it, sparse so
    /// that new users fit in between (see `search`).
    pub sort_rank: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
