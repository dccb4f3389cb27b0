//! The System Owner token (DESIGN 1): its unblock key is generated once per installation,
//! shown once (whole or as shares) and never kept; custody keeps only its key check value
//! (InitSoToken, GetSoTokenInfo).

use cms_cardcrypto::checksum;
use cms_proto::custody::v1 as pb;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set};

use crate::audit::{self, Event};
use crate::convert::{algorithm_from_proto, hex_upper, shares_to_proto, stored_algorithm_to_proto};
use crate::custody::{Custody, context};
use crate::error::Error;
use crate::guards::Peer;
use crate::master_keys::check_reference;
use crate::seal;
use crate::store::entities::so_token;
use crate::wrap;

/// The id of the one SO token row.
const SO_TOKEN_ID: i64 = 1;

fn so_token_exists(label: &str) -> Error {
    Error::AlreadyExists(format!(
        "a System Owner token ({label}) is already initialised: there is one per installation"
    ))
}

/// What is known of the SO token (no secret): algorithm, KCV and shares.
fn so_info(row: &so_token::Model) -> pb::SoTokenInfo {
    pb::SoTokenInfo {
        label: row.label.clone(),
        algorithm: stored_algorithm_to_proto(&row.algorithm),
        kcv: row.kcv.clone(),
        created_at: Some(audit::timestamp(row.created_at)),
        share_count: u32::try_from(row.share_count).unwrap_or(0),
        share_threshold: u32::try_from(row.share_threshold).unwrap_or(0),
        card_id: row.card_id.clone(),
    }
}

impl Custody {
    /// InitSoToken: generates the unblock key and answers it once; audited before it is kept.
    pub(crate) async fn init_so_token(
        &self,
        peer: &Peer,
        req: pb::InitSoTokenRequest,
    ) -> Result<pb::InitSoTokenResponse, Error> {
        let caller = self.caller(peer)?;
        caller.require_admin()?;
        self.self_test.as_ref().map_err(|_| Error::SelfTestFailed)?;
        let label = if req.label.is_empty() {
            "so-token".to_owned()
        } else {
            req.label.clone()
        };
        check_reference(&label)?;
        let algorithm = algorithm_from_proto(req.algorithm, "algorithm")?;
        if req.share_count > 0
            && (req.share_threshold == 0 || req.share_threshold > req.share_count)
        {
            return Err(Error::Invalid {
                field: "share_threshold",
                message: "with shares, the threshold must be 1 to the share count".into(),
            });
        }
        // One per installation (DESIGN 1): whatever its label.
        if let Some(existing) = so_token::Entity::find().one(&self.db).await? {
            return Err(so_token_exists(&existing.label));
        }
        let mut failed = false;
        let key = cms_cardcrypto::SoUnblockKey::generate(algorithm, &mut |buf| {
            failed |= wrap::random(buf).is_err();
        })
        .map_err(|e| Error::Precondition(e.to_string()))?;
        if failed {
            return Err(Error::Precondition(
                "the system random generator failed".into(),
            ));
        }
        let bytes = key.key().expose_bytes();
        let shares = if req.share_count > 0 {
            seal::split_secret(bytes, req.share_threshold, req.share_count)?
        } else {
            Vec::new()
        };
        let kcv = hex_upper(&key.kcv());
        let mut auth = context(req.auth);
        auth.card_id = req.card_id.clone();
        let event = Event::so_token_init(
            &caller.identity,
            auth,
            &label,
            algorithm.as_str(),
            req.share_count,
            req.share_threshold,
        );
        self.audit.record(event, None).await?;
        let row = so_token::ActiveModel {
            // A fixed id: a racing second initialisation fails on the primary key.
            id: Set(SO_TOKEN_ID),
            label: Set(label),
            algorithm: Set(algorithm.as_str().to_owned()),
            kcv: Set(kcv.clone()),
            share_count: Set(i32::try_from(req.share_count).unwrap_or(0)),
            share_threshold: Set(i32::try_from(req.share_threshold).unwrap_or(0)),
            card_id: Set(req.card_id),
            created_at: Set(audit::now_ms()),
        }
        .insert(&self.db)
        .await
        .map_err(|e| match e.sql_err() {
            Some(sea_orm::SqlErr::UniqueConstraintViolation(_)) => {
                so_token_exists("initialised meanwhile")
            }
            _ => Error::from(e),
        })?;
        Ok(pb::InitSoTokenResponse {
            so_unblock_key: Some(cms_proto::common::v1::TypedCode {
                hex: cms_cardcrypto::format_groups(bytes),
                checksum: checksum(bytes),
            }),
            shares: shares_to_proto(shares),
            kcv,
            info: Some(so_info(&row)),
        })
    }

    /// GetSoTokenInfo.
    pub(crate) async fn so_token_info(
        &self,
        peer: &Peer,
        req: pb::GetSoTokenInfoRequest,
    ) -> Result<pb::GetSoTokenInfoResponse, Error> {
        self.caller(peer)?;
        let mut query = so_token::Entity::find().order_by_asc(so_token::Column::Id);
        if !req.label.is_empty() {
            query = query.filter(so_token::Column::Label.eq(req.label));
        }
        let row = query
            .one(&self.db)
            .await?
            .ok_or_else(|| Error::NotFound("no SO token has been initialised".into()))?;
        Ok(pb::GetSoTokenInfoResponse {
            info: Some(so_info(&row)),
        })
    }
}
