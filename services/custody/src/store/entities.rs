//! Custody's tables. Nothing here holds a plaintext key, a challenge, a response or a PUK:
//! master keys are wrapped under the KEK, challenges, cards and sessions are keyed
//! fingerprints, PUKs are derived and never stored.

pub mod seal_meta {
    use sea_orm::entity::prelude::*;

    /// One row (id 1) once the KEK exists: how it is split, and its public check value.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "seal_meta")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i32,
        pub threshold: i32,
        pub share_count: i32,
        pub kek_check: Vec<u8>,
        pub mode: crate::store::states::SealMode,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

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
        pub state: crate::store::states::KeyState,
        pub description: String,
        pub origin: crate::store::states::KeyOrigin,
        /// AES-256-GCM under the KEK, bound to (reference, "master-key", version).
        pub wrapped: Vec<u8>,
        pub created_at: i64,
        pub retired_at: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod card_use {
    use sea_orm::entity::prelude::*;

    /// One answered challenge: for the per-card limit and replay refusal. Written until
    /// migration 4; newer uses are in `audit_record` (still read at start).
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "card_use")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        #[sea_orm(indexed)]
        pub card_fp: Vec<u8>,
        #[sea_orm(indexed)]
        pub challenge_fp: Vec<u8>,
        pub at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod audit_record {
    use sea_orm::entity::prelude::*;

    /// One link of the audit hash chain.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_record")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub seq: i64,
        pub at: i64,
        pub event: i32,
        pub outcome: i32,
        pub caller: String,
        pub actor_kind: i32,
        pub actor_id: String,
        pub user_id: String,
        pub card_id: Vec<u8>,
        pub flow: i32,
        pub approval_id: String,
        pub request_id: String,
        pub key_reference: String,
        pub key_version: i32,
        pub reason: String,
        pub prev_hash: Vec<u8>,
        pub hash: Vec<u8>,
        /// A granted claim's keyed fingerprints of the card and of (card, challenge): what the
        /// per-card limit and the replay refusal are rebuilt from at start. Written in the
        /// record's own row so that a batch is one INSERT; outside the hash chain, like the
        /// `card_use` rows written before they moved here.
        pub card_fp: Option<Vec<u8>>,
        pub challenge_fp: Option<Vec<u8>>,
        /// Event-specific non-secret detail, a JSON object of strings ("" when none; in the
        /// hash chain when not empty, so records written before it keep their hashes).
        pub attributes: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod so_token {
    use sea_orm::entity::prelude::*;

    /// A System Owner token: only the key check value of its unblock key is kept.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "so_token")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        #[sea_orm(unique)]
        pub label: String,
        pub algorithm: String,
        pub kcv: String,
        pub share_count: i32,
        pub share_threshold: i32,
        pub card_id: Vec<u8>,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod puk_card {
    use sea_orm::entity::prelude::*;

    /// The PIV PUK state of one card (never the PUK itself: it is derived). The card is the
    /// keyed fingerprint of (PUK master key reference, card id), as in `card_use`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "puk_card")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        #[sea_orm(unique)]
        pub card_fp: Vec<u8>,
        /// The PUK version on the card as custody knows it.
        pub puk_version: i64,
        /// That version was read out offline (helpdesk) and must be rotated.
        pub exposed: bool,
        pub exposed_at: Option<i64>,
        /// Last confirmed rotation.
        pub rotated_at: Option<i64>,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod puk_session {
    use sea_orm::entity::prelude::*;

    /// An online session that had its PUK released: one release per session, ever.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "puk_session")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        /// Keyed fingerprint of the session id.
        #[sea_orm(unique)]
        pub session_fp: Vec<u8>,
        pub card_fp: Vec<u8>,
        /// The PUK version released in it.
        pub puk_version: i64,
        pub at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
