//! The states custody keeps in string columns, as enums. Each is stored as the string it
//! always was (sea-orm's `DeriveActiveEnum` with string values), so rows written before
//! read the same and the schema does not change.

use sea_orm::entity::prelude::*;

/// A master key version's lifecycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum KeyState {
    /// Usable; the highest active version of a reference is its current one.
    #[sea_orm(string_value = "active")]
    Active,
    /// Kept for the record, never used again.
    #[sea_orm(string_value = "retired")]
    Retired,
}

/// Where a master key version's bytes came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum KeyOrigin {
    /// Generated inside custody (or inside the HSM).
    #[sea_orm(string_value = "generated")]
    Generated,
    /// Combined from custodians' components in an import ceremony.
    #[sea_orm(string_value = "imported")]
    Imported,
}

impl KeyOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Generated => "generated",
            Self::Imported => "imported",
        }
    }
}

/// How the key-encryption key is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum SealMode {
    /// Split into custodians' Shamir shares: custody starts sealed.
    #[sea_orm(string_value = "shares")]
    Shares,
    /// In a development seal file: custody unseals itself at start.
    #[sea_orm(string_value = "dev-file")]
    DevFile,
}

#[cfg(test)]
mod tests {
    use sea_orm::{DbBackend, Schema};

    use crate::store::entities::{master_key, seal_meta};

    /// The tables as they were declared while these states were plain strings.
    mod as_strings {
        pub mod master_key {
            use sea_orm::entity::prelude::*;

            #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
            #[sea_orm(table_name = "master_key")]
            pub struct Model {
                #[sea_orm(primary_key)]
                pub id: i64,
                #[sea_orm(unique_key = "ref_version")]
                pub reference: String,
                #[sea_orm(unique_key = "ref_version")]
                pub version: i32,
                pub algorithm: String,
                pub kcv: String,
                pub state: String,
                pub description: String,
                pub origin: String,
                pub wrapped: Vec<u8>,
                pub created_at: i64,
                pub retired_at: Option<i64>,
            }

            #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
            pub enum Relation {}

            impl ActiveModelBehavior for ActiveModel {}
        }

        pub mod seal_meta {
            use sea_orm::entity::prelude::*;

            #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
            #[sea_orm(table_name = "seal_meta")]
            pub struct Model {
                #[sea_orm(primary_key, auto_increment = false)]
                pub id: i32,
                pub threshold: i32,
                pub share_count: i32,
                pub kek_check: Vec<u8>,
                pub mode: String,
                pub created_at: i64,
            }

            #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
            pub enum Relation {}

            impl ActiveModelBehavior for ActiveModel {}
        }
    }

    /// The enums change neither the schema (the migrations create tables from the entities)
    /// nor what is stored.
    #[test]
    fn the_schema_is_the_one_with_strings() {
        for backend in [DbBackend::Sqlite, DbBackend::Postgres] {
            let schema = Schema::new(backend);
            let ddl = |table| backend.build(&table).to_string();
            assert_eq!(
                ddl(schema.create_table_from_entity(master_key::Entity)),
                ddl(schema.create_table_from_entity(as_strings::master_key::Entity)),
                "{backend:?}"
            );
            assert_eq!(
                ddl(schema.create_table_from_entity(seal_meta::Entity)),
                ddl(schema.create_table_from_entity(as_strings::seal_meta::Entity)),
                "{backend:?}"
            );
        }
    }

    #[test]
    fn each_state_is_stored_as_its_old_string() {
        use sea_orm::ActiveEnum;

        use super::{KeyOrigin, KeyState, SealMode};
        assert_eq!(KeyState::Active.to_value(), "active");
        assert_eq!(KeyState::Retired.to_value(), "retired");
        assert_eq!(KeyOrigin::Generated.to_value(), "generated");
        assert_eq!(KeyOrigin::Imported.to_value(), "imported");
        assert_eq!(KeyOrigin::Imported.as_str(), "imported");
        assert_eq!(SealMode::Shares.to_value(), "shares");
        assert_eq!(SealMode::DevFile.to_value(), "dev-file");
    }
}
