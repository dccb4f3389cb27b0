//! Client certificates bound to operators: by issuer and serial, or by SPKI hash.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "operator_certificates")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub operator_id: String,
    pub position: i32,
    /// Issuer DN (issuer-serial bindings), else empty.
    pub issuer_dn: String,
    /// Serial number as lower-case hex without leading zero bytes, else empty.
    pub serial_hex: String,
    /// SHA-256 of the SPKI as lower-case hex (SPKI bindings), else empty.
    pub spki_hex: String,
    pub subject_dn: String,
    pub not_after: Option<i64>,
    pub label: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
